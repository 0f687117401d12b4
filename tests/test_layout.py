"""
The project's layout as the README promises it: imports run one way (the graph of project imports, read
with `ast` from every module, function-level imports included, has no cycle), no module imports train.py
(the main job is a script, not a library), and the concept files stay short enough to read beside the paper.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPT_FILES = ("flow_matching.py", "sde_sampler.py", "grpo.py", "cold_start.py", "router.py", "opd_loss.py",
                 "mar.py", "rewards.py", "eval.py")


def project_modules():
    """{dotted name: path} of the project's modules: the top-level files and the world package."""
    out = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    world = os.path.join(ROOT, "world")
    out.update({f"world.{f[:-3]}": os.path.join(world, f) for f in os.listdir(world) if f.endswith(".py")})
    out["world"] = out.pop("world.__init__")
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
    src.write_text("import os\nimport rewards\nfrom world import toy_world\nfrom config import Config\n"
                   "def f():\n    import train\n")
    mods = {"rewards": "", "world": "", "world.toy_world": "", "config": "", "train": ""}
    assert imports_of(src, mods) == {"rewards", "world.toy_world", "config", "train"}


def test_project_imports_form_a_dag():
    graph = import_graph()
    assert {"train", "teachers", "rollouts", "opd_loss", "world.toy_world", "world.pretrain"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_module_imports_train():
    importers = sorted(name for name, deps in import_graph().items() if "train" in deps)
    assert importers == [], f"{importers} import train.py; import the modules it uses instead"


def test_paper_concepts_do_not_import_the_world_tools_or_trainers():
    """The maths files depend only on one another (and torch): a reader can run them alone."""
    graph = import_graph()
    maths = {"flow_matching", "sde_sampler", "grpo", "opd_loss", "mar", "router"}
    for name in maths:
        assert graph[name] <= maths, (name, graph[name] - maths)


def test_file_lengths():
    lines = lambda f: sum(1 for _ in open(os.path.join(ROOT, f)))  # noqa: E731
    assert lines("train.py") <= 350
    for f in CONCEPT_FILES:
        assert lines(f) <= 250, (f, lines(f))
