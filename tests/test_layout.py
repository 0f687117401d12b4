"""
The project's layout as the README promises it. The top level is the paper's ten files; everything else lives
in a folder named by its role (support/, world/, tools/). Imports run one way, read with `ast` from every
module, function-level imports included:
  the maths files import only one another; world/ imports nothing of the project outside world/;
  support/config.py imports no project module; support/ never imports train, eval or a tool;
  only entry-point tools import train, and nothing outside tools/ imports a tool; the graph has no cycle.
Every module is at most 300 lines, train.py (the two training loops) at most 400.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = {"flow_matching.py", "sde_sampler.py", "grpo.py", "cold_start.py", "router.py", "opd_loss.py", "mar.py",
        "rewards.py", "train.py", "eval.py"}
MATHS = {"flow_matching", "sde_sampler", "grpo", "cold_start", "router", "opd_loss", "mar"}
PACKAGES = ("support", "world", "tools")


def project_modules():
    """{dotted name: path}: the top-level files and the modules of each package folder."""
    out = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py") and f != "conftest.py"}
    for pkg in PACKAGES:
        folder = os.path.join(ROOT, pkg)
        out.update({f"{pkg}.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")})
        if f"{pkg}.__init__" in out:
            out[pkg] = out.pop(f"{pkg}.__init__")
    return out


def imports_of(path, modules):
    """The project modules `path` imports, anywhere in the file (`import a`, `from a import b`,
    `from world import toy_world`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            if node.module in modules and not any(f"{node.module}.{a.name}" in modules for a in node.names):
                found.add(node.module)
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph):
    """One cycle of the directed graph as a list of nodes (first == last), or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_of_reads_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nimport rewards\nfrom world import toy_world\nfrom support.config import Config\n"
                   "def f():\n    import train\n")
    mods = {"rewards": "", "world": "", "world.toy_world": "", "support.config": "", "train": ""}
    assert imports_of(src, mods) == {"rewards", "world.toy_world", "support.config", "train"}


def test_the_top_level_is_the_card():
    files = {f for f in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, f)) and not f.startswith(".")}
    assert {f for f in files if f.endswith(".py")} == CARD | {"conftest.py"}
    assert files - CARD == {"conftest.py", "README.md", "PAPER_NOTES.md", "requirements.txt"}


def test_project_imports_form_a_dag():
    graph = import_graph()
    assert {"train", "support.rollouts", "opd_loss", "world.toy_world", "tools.pretrain_world"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_maths_files_import_only_one_another():
    """A reader can run the paper's maths alone."""
    graph = import_graph()
    for name in MATHS:
        assert graph[name] <= MATHS, (name, graph[name] - MATHS)


def test_world_is_a_leaf_and_config_imports_nothing_of_the_project():
    graph = import_graph()
    for name, deps in graph.items():
        if name == "world" or name.startswith("world."):
            assert all(d == "world" or d.startswith("world.") for d in deps), (name, deps)
    assert graph["support.config"] == set()


def test_support_never_imports_a_stage_or_a_tool_and_nothing_imports_a_tool():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("support"):
            assert not deps & {"train", "eval"} and not any(d.startswith("tools") for d in deps), (name, deps)
        if not name.startswith("tools."):
            assert "train" not in deps, f"{name} imports train.py; only entry-point tools may"
        if not name.startswith("tools."):
            assert not any(d.startswith("tools") for d in deps), f"{name} imports a tool: {deps}"


def test_module_lengths():
    for name, path in project_modules().items():
        n = sum(1 for _ in open(path))
        assert n <= (400 if name == "train" else 300), (name, n)
