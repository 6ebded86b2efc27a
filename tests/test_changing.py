"""The edits a learner makes (docs/changing.md), each on a copy of the repo, run as a learner runs it.

Each test copies the project's modules into a folder of its own, edits them there as a person would in an editor,
and runs a one-batch dry run of main_mnist.py on the real MNIST files; the repo itself is never touched.
"""
import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

import main_mnist
from conftest import REPO
from machinery import settings

PACKAGE = "machinery"  # the folder of the machinery behind the learner's files
DRY = ["--dry-run", "--epochs", "1", "--batch-size", "64", "--test-batch-size", "256"]


def python_files():
    """The project's Python files, relative to the repo: the learner's at the top, and the package's."""
    return settings.project_files()


@pytest.fixture
def copy(tmp_path):
    """A copy of the project's modules (no git: its runs record a hash of these files)."""
    folder = tmp_path / "repo"
    (folder / PACKAGE).mkdir(parents=True)
    for name in python_files():
        shutil.copy(os.path.join(REPO, name), folder / name)
    return folder


def set_constant(path, name, value):
    """Edits the value of `NAME = value  # comment` in the block, as a learner does, keeping the comment."""
    text = path.read_text()
    pattern = re.compile(rf"^{name} = .*?(\s+#.*)?$", re.MULTILINE)
    assert len(pattern.findall(text)) == 1
    path.write_text(pattern.sub(lambda match: f"{name} = {value}{match.group(1) or ''}", text))


def edit(path, old, new):
    """Replaces the one line that starts with `old` (a setting's `NAME =`, a line of code) by `new`."""
    lines = path.read_text().splitlines(keepends=True)
    matches = [i for i, line in enumerate(lines) if line.strip().startswith(old)]
    assert len(matches) == 1, f"{old!r} is on {len(matches)} lines of {path.name}"
    indent = lines[matches[0]][:len(lines[matches[0]]) - len(lines[matches[0]].lstrip())]
    lines[matches[0]] = indent + new + "\n"
    path.write_text("".join(lines))


def run(folder, *args, python_prelude=""):
    """python3 main_mnist.py ARGS in `folder`, as a user runs it; the CompletedProcess (text)."""
    command = [sys.executable, "main_mnist.py", *args]
    if python_prelude:  # statements run first, in the same interpreter (to stand in for another platform)
        command = [sys.executable, "-c", python_prelude + "\nimport runpy, sys\nsys.argv = ['main_mnist.py', "
                   + ", ".join(map(repr, args)) + "]\nrunpy.run_path('main_mnist.py', run_name='__main__')"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)


def record(out_dir):
    return json.loads((out_dir / "run.json").read_text())


def printed_settings(stdout):
    """{NAME: (value as printed, mark or None)} from the settings a run prints first: the indented lines under
    its "Settings (...)" line."""
    lines = stdout.splitlines()
    assert lines[0].startswith("Settings (")
    head = "\n".join(line for line in lines[1:next(i for i, line in enumerate(lines) if i and line[:2] != "  ")])
    items = re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)(?: \[(\w+)\])?", head)
    return {name: (value, mark or None) for name, value, mark in items}


def test_a_value_edited_in_the_block_is_used_even_with_another_model(copy, real_data_dir, tmp_path):
    # The learner picks CompactNet in the block and lowers its lr: both edits are what the run uses.
    set_constant(copy / "main_mnist.py", "MODEL", '"CompactNet"')
    set_constant(copy / "main_mnist.py", "LR", "0.05")
    out_dir = tmp_path / "run"
    result = run(copy, *DRY, "--data-dir", real_data_dir, "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    settings = record(out_dir)["hyperparameters"]
    assert settings["MODEL"] == "CompactNet" and settings["LR"] == 0.05
    assert settings["SCHEDULE"] == main_mnist.SCHEDULE  # the block's, not the recipe's
    printed = printed_settings(result.stdout)
    assert printed["MODEL"] == ("CompactNet", None) and printed["LR"] == ("0.05", None)  # no mark: the block's
    assert "--model CompactNet would apply its recipe" in result.stdout.split("Run folder:")[0]


def test_the_recipe_of_model_on_the_command_line_is_marked_where_it_replaces_the_block(copy, real_data_dir, tmp_path):
    set_constant(copy / "main_mnist.py", "LR", "0.05")
    out_dir = tmp_path / "run"
    result = run(copy, *DRY, "--model", "CompactNet", "--data-dir", real_data_dir, "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    recipe_lr = main_mnist.RECIPES["CompactNet"]["LR"]
    assert record(out_dir)["hyperparameters"]["LR"] == recipe_lr
    printed = printed_settings(result.stdout)
    assert printed["LR"] == (str(recipe_lr), "recipe") and printed["MODEL"] == ("CompactNet", "flag")


def test_turning_the_rotation_off_is_a_setting_in_run_json_and_in_compare(copy, real_data_dir, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    assert run(copy, *DRY, "--data-dir", real_data_dir, "--out-dir", str(runs_dir / "a")).returncode == 0
    set_constant(copy / "main_mnist.py", "ROTATION", "0.0")
    set_constant(copy / "main_mnist.py", "SHIFT", "2")
    result = run(copy, *DRY, "--data-dir", real_data_dir, "--out-dir", str(runs_dir / "b"))
    assert result.returncode == 0, result.stderr
    printed, saved = printed_settings(result.stdout), record(runs_dir / "b")["hyperparameters"]
    assert (printed["ROTATION"], printed["SHIFT"]) == (("0.0", None), ("2", None))
    assert (saved["ROTATION"], saved["SHIFT"]) == (0.0, 2)

    capsys.readouterr()
    main_mnist.main(["--compare", "--out-dir", str(runs_dir)])  # --compare reads run.json alone: here is as good
    header, *rows = [line.split() for line in capsys.readouterr().out.splitlines()[:3]]
    assert header[:6] == ["run", "model", "rotation", "shift", "code", "epochs"]  # what differs, the code too
    assert [row[2:4] for row in rows] == [[str(main_mnist.ROTATION), str(main_mnist.SHIFT)], ["0.0", "2"]]
    codes = [record(runs_dir / name)["code"]["source_hash"] for name in ("a", "b")]  # no git: a hash of the files
    assert codes[0] != codes[1] and [row[4] for row in rows] == [f"files:{code[:7]}" for code in codes]


def test_a_model_that_returns_raw_scores_trains_with_cross_entropy_and_predict_reads_it(copy, real_data_dir,
                                                                                          tmp_path):
    # As most tutorials write forward: the scores of the last layer, no log_softmax.
    edit(copy / "model.py", "return F.log_softmax(x, dim=1)", "return x")
    out_dir = tmp_path / "run"
    result = run(copy, *DRY, "--model", "Net", "--data-dir", real_data_dir, "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert "Loss: F.cross_entropy (the model returns raw scores)" in result.stdout
    assert record(out_dir)["loss"] == "F.cross_entropy"

    image = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(image).line([(60, 10), (60, 110)], fill=0, width=12)
    image.save(tmp_path / "one.png")
    read = subprocess.run([sys.executable, "predict.py", str(tmp_path / "one.png"), "--checkpoint",
                           str(out_dir / "model.pt"), "--out", str(tmp_path / "p.png")], cwd=copy,
                          capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr
    percents = [float(p) for p in re.findall(r"(\d+\.\d)%", read.stdout.split("top 3:")[1])]
    assert len(percents) == 3 and percents == sorted(percents, reverse=True) and sum(percents) <= 100.05


def test_a_model_with_the_wrong_number_of_outputs_stops_with_one_line(copy, real_data_dir, tmp_path):
    edit(copy / "model.py", "self.fc2 = nn.Linear(50, 10)", "self.fc2 = nn.Linear(50, 5)")
    result = run(copy, *DRY, "--model", "Net", "--data-dir", real_data_dir, "--out-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the model's forward must return a tensor of shape [batch, 10] (a score or log-probability per "
        "digit), not [8, 5], for a batch of shape [8, 1, 28, 28]"]


def test_an_invalid_edit_to_the_block_stops_before_any_work(copy, tmp_path):
    edit(copy / "main_mnist.py", "EPOCHS =", "EPOCHS = 2.5")  # its comment gone too: --help does without it
    result = run(copy, "--out-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert "EPOCHS (--epochs) must be a whole number, at least 1, not 2.5" in result.stderr


# ---- Windows and macOS ----

BLOCK_POSIX = "import sys\nsys.modules['fcntl'] = None  # as on Windows: `import fcntl` fails"


def test_the_modules_import_and_a_dry_run_works_without_posix_modules(copy, real_data_dir, tmp_path):
    tqdm_alone = BLOCK_POSIX + "\nimport tqdm\ntqdm.tqdm(range(1), dynamic_ncols=True)"
    probe = subprocess.run([sys.executable, "-c", tqdm_alone], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:  # tqdm up to at least 4.60 reads the terminal's size through fcntl on Linux
        pytest.skip(f"this tqdm ({importlib.metadata.version('tqdm')}) cannot run on Linux without fcntl, so "
                    f"Windows cannot be stood in for here (on Windows, tqdm measures the console its own way)")
    modules = ", ".join(name[:-3].replace(os.sep, ".") for name in python_files() if name != "app.py")
    modules += ", app" if importlib.util.find_spec("gradio") else ""  # (app.py needs requirements-demo.txt)
    importing = subprocess.run([sys.executable, "-c", BLOCK_POSIX + f"\nimport {modules}"],
                               cwd=copy, capture_output=True, text=True, timeout=300)
    assert importing.returncode == 0, importing.stderr
    out_dir = tmp_path / "run"
    result = run(copy, *DRY, "--data-dir", real_data_dir, "--out-dir", str(out_dir), python_prelude=BLOCK_POSIX)
    assert result.returncode == 0, result.stderr
    assert record(out_dir)["status"] == "finished"
    assert "no file lock" in result.stderr  # with neither fcntl nor msvcrt, the run says it is unguarded


# A stand-in for Windows' msvcrt on Linux: its locking() on POSIX byte-range locks, which, like Windows' locks,
# belong to a process and end with it. It runs the code path runs.py takes on Windows, lock and message included.
MSVCRT_STAND_IN = '''
import subprocess  # first: it takes a module named msvcrt for a sign that it runs on Windows
import fcntl as _fcntl, os as _os, sys as _sys, types as _types
msvcrt = _types.ModuleType("msvcrt")
msvcrt.LK_NBLCK, msvcrt.LK_UNLCK = 2, 0
def _locking(fd, mode, nbytes):
    start = _os.lseek(fd, 0, _os.SEEK_CUR)
    kind = _fcntl.LOCK_UN if mode == msvcrt.LK_UNLCK else _fcntl.LOCK_EX | _fcntl.LOCK_NB
    try:
        _fcntl.lockf(fd, kind, nbytes, start)
    except BlockingIOError:
        raise PermissionError(13, "Permission denied") from None
msvcrt.locking = _locking
_sys.modules["msvcrt"] = msvcrt
_sys.modules["fcntl"] = None
'''


def test_the_windows_lock_names_the_other_process_and_ends_with_it(copy, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", MSVCRT_STAND_IN + "\nfrom machinery import runs\nimport time\nassert runs.fcntl is None"
                               f"\nruns.lock_folder({str(folder)!r})\nprint('locked', flush=True)\ntime.sleep(300)"],
                              cwd=copy, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = MSVCRT_STAND_IN + f"\nfrom machinery import runs\nruns.lock_folder({str(folder)!r})"
        refused = subprocess.run([sys.executable, "-c", second], cwd=copy, capture_output=True, text=True, timeout=60)
        assert f"is in use by another run (process {holder.pid})" in refused.stderr
    finally:
        holder.kill()  # as a crash or Task Manager would: no clean-up runs
        holder.wait()
    taken = subprocess.run([sys.executable, "-c", second + "\nprint('locked')"], cwd=copy, capture_output=True,
                           text=True, timeout=60)
    assert taken.stdout.strip() == "locked", taken.stderr  # no stale lock
    assert (folder / ".lock").read_text().strip().isdigit()


# ---- Every import declared ----

def imported_packages(path):
    """The top-level names a Python file imports, at any depth (imports inside functions too)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def declared(requirements_file):
    with open(os.path.join(REPO, requirements_file)) as f:
        return {re.split(r"[<>=!~ ;\[]", line.strip())[0].lower().replace("_", "-")
                for line in f if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("files, requirements", [
    ([name for name in python_files() if name != "app.py"], ["requirements.txt"]),
    (["app.py"], ["requirements.txt", "requirements-demo.txt"]),
])
def test_every_package_the_code_imports_is_in_its_requirements(files, requirements):
    local = {name[:-3].split(os.sep)[0] for name in python_files()}
    distributions = importlib.metadata.packages_distributions()  # import name -> the distributions providing it
    wanted = set().union(*(declared(name) for name in requirements))
    for file in files:
        for package in imported_packages(os.path.join(REPO, file)) - local - set(sys.stdlib_module_names):
            providers = {name.lower().replace("_", "-") for name in distributions.get(package, [package])}
            assert providers & wanted, f"{file} imports {package} ({', '.join(providers)}), not in {requirements}"


def test_each_room_imports_only_what_its_purpose_needs():
    assert "PIL" not in imported_packages(os.path.join(REPO, "utils.py"))  # data and training: no image files
    assert "matplotlib" not in imported_packages(os.path.join(REPO, PACKAGE, "images.py"))  # to_mnist draws nothing
    for name in python_files():
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            assert len(f.readlines()) <= 550, f"{name} has grown past one room"


def test_the_learners_files_stand_at_the_top_and_the_machinery_in_its_folder():
    top = {name for name in python_files() if os.sep not in name}
    assert top == {"main_mnist.py", "model.py", "utils.py", "augment.py", "predict.py", "app.py"}
    for name in set(python_files()) - top:  # each file of the package says what its one job is
        assert ast.get_docstring(ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())), name


def test_no_module_imports_one_that_imports_it_back():
    """The import graph of the project's own modules has no circle (a circle makes an edit's error name a
    module that has nothing to do with it)."""
    local = {name[:-3].replace(os.sep, "."): name for name in python_files()}
    graph = {}
    for module, name in local.items():
        tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                edges |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = edges & set(local)
    visiting, done = [], set()

    def visit(module):
        assert module not in visiting, "import circle: " + " -> ".join(visiting[visiting.index(module):] + [module])
        if module in done:
            return
        visiting.append(module)
        for other in graph[module]:
            visit(other)
        visiting.pop()
        done.add(module)
    for module in graph:
        visit(module)
