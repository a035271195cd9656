"""The layout: entry points at the top, tools in tools/ that no product module imports, every script's --help,
and a quiet start (no backend lines; bad input refused before Keras is imported)."""

import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import READER_IMAGES, ROOT


@pytest.mark.parametrize("script", ["train", "test", "export_safe", "dataset", "synth", "plots", "serve", "label",
                                    "tools.rawformats", "tools.bench", "tools.speed", "tools.fewlabels", "tools.eyeread",
                                    "tools.pretrain", "tools.siteloop", "tools.keystrokes", "tools.teacher_filters", "tools.student_filters",
                                    "tools.label_screenshot"])
def test_every_script_has_help(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


# TensorFlow's, absl's and CUDA's start-up and runtime lines (native glog-style lines start with I/W/E/F and a date)
BACKEND_NOISE = re.compile(r"^[IWEF]\d{4} |absl|oneDNN|cuda|cuInit|cpu_feature_guard|tensorflow|retracing",
                           re.IGNORECASE)


def imported_modules(path):
    """Every module name an `import` or `from ... import` in the file names, wherever it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_product_module_imports_a_tool():
    tools = {path.stem for path in (ROOT / "tools").glob("*.py")} - {"__init__"}
    assert {"bench", "speed", "pretrain", "fewlabels", "rawformats", "eyeread"} <= tools
    product = sorted(ROOT.glob("*.py"))
    assert {"train.py", "test.py", "serve.py", "export_safe.py", "model.py", "preprocess.py"} <= {p.name for p in product}
    for path in product:
        wrong = {name for name in imported_modules(path) if name.split(".")[0] == "tools" or name in tools}
        assert not wrong, f"{path.name} imports the tool(s) {sorted(wrong)}"


def test_the_tools_run_from_the_repository_root_as_scripts():
    result = subprocess.run([sys.executable, "tools/fewlabels.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def run_quietly(*args, env=None):
    """A script as a user runs it, with no logging variable of ours or TensorFlow's set."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CAPTCHA_VERBOSE")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**clean, **(env or {})})


def noise(stderr):
    return [line for line in stderr.splitlines() if BACKEND_NOISE.search(line)]


def test_reading_one_image_prints_no_backend_lines_unless_verbose():
    result = run_quietly("test.py", "--model", "tests/fixtures/reader.keras", "--image", READER_IMAGES[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{READER_IMAGES[0]} -> {READER_IMAGES[0].stem} ")
    assert noise(result.stderr) == []
    loud = run_quietly("test.py", "--model", "tests/fixtures/reader.keras", "--image", READER_IMAGES[0],
                       env={"CAPTCHA_VERBOSE": "1"})
    assert loud.returncode == 0 and noise(loud.stderr), "CAPTCHA_VERBOSE=1 should let TensorFlow's lines through"


def test_a_refused_folder_prints_one_line_and_nothing_of_the_backend(tmp_path):
    for i, image in enumerate(READER_IMAGES[:12]):
        (tmp_path / f"{i:032x}.png").write_bytes(image.read_bytes())  # hash names: no label in them
    result = run_quietly("train.py", "--data_dir", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


BLOCK_BACKENDS = "import sys, runpy; sys.modules.update(keras=None, tensorflow=None, jax=None); sys.argv = sys.argv[1:]; " \
                 "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_bad_input_is_refused_before_keras_or_tensorflow_is_imported(tmp_path):
    """With Keras, TensorFlow and JAX made unimportable, each refusal is still its one line (precheck.py)."""
    for i, image in enumerate(READER_IMAGES[:8]):
        (tmp_path / f"{i:032x}.png").write_bytes(image.read_bytes())
    cases = [(["train.py", "--data_dir", tmp_path], "the file names do not look like labels"),
             (["train.py", "--data_dir", tmp_path / "nope"], "folder does not exist"),
             (["train.py", "--data_dir", tmp_path, "--labels", tmp_path / "nope.csv"], "labels file does not exist"),
             (["train.py", "--unlabeled", tmp_path / "nope", "--teacher", "ddddocr"], "folder does not exist"),
             (["export_safe.py", "--in_keras", tmp_path / "nope.keras", "--out_keras", tmp_path / "x.keras"],
              "model file does not exist"),
             (["test.py", "--model", "tests/fixtures/reader.keras", "--folder", tmp_path / "nope"],
              "folder does not exist")]
    for args, message in cases:
        result = run_quietly("-c", BLOCK_BACKENDS, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, \
            (args, result.stderr)


def test_a_whole_built_in_run_prints_no_backend_lines(tmp_path):
    result = run_quietly("train.py", "--synth_dir", tmp_path / "synth", "--synth_count", "48", "--preset", "tiny",
                         "--init_from", "none", "--epochs", "2", "--batch_size", "8", "--workers", "1",
                         "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "crnn_ctc_best.keras").exists()
    assert noise(result.stderr) == [], result.stderr


def imported_at_load(module, found=None):
    """The project's modules that importing `module` loads: its module-level imports, followed (imports inside
    functions, such as Keras for a .keras file, are left out)."""
    found = set() if found is None else found
    if module in found or not (ROOT / f"{module}.py").is_file():
        return found
    found.add(module)
    for node in ast.parse((ROOT / f"{module}.py").read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            imported_at_load(name.split(".")[0], found)
    return found


def test_the_docker_image_copies_what_serve_py_imports_and_serves_a_models_folder():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copy = dockerfile[dockerfile.index("COPY arithmetic.py"):].split("./", 1)[0]
    copied = copy.replace("\\", " ").split()[1:]
    assert sorted(copied) == sorted(f"{name}.py" for name in imported_at_load("serve"))
    assert 'CMD ["--models", "/models"]' in dockerfile


def test_the_readme_names_the_files_the_python_api_needs():
    listed = re.search(r"copy the seven files it\s+needs, `([^`]+)`", (ROOT / "README.md").read_text()).group(1).split()
    assert sorted(listed) == sorted(f"{name}.py" for name in imported_at_load("reader"))


def test_no_product_function_takes_more_than_eight_parameters():
    """A function that needs more takes a section object (dataset.Batching, reader.ReadSettings, ...)."""
    long = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                named = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                count = len(named) + bool(arguments.vararg) + bool(arguments.kwarg) - (named[:1] in (["self"], ["cls"]))
                if count > 8:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({count})")
    assert not long, long


def test_no_library_module_imports_the_training_config():
    """train.py resolves its flags and hands each module what it needs; only train.py knows TrainConfig."""
    for path in sorted(ROOT.glob("*.py")):
        if path.name != "train.py":
            assert "train" not in imported_modules(path) and "TrainConfig" not in path.read_text(), path.name


def test_each_section_of_the_flags_is_named_and_defaulted_as_the_flags_are():
    """A module's section (cli.section) takes train.py's flags by name: a field that is no flag, or a default that
    differs from the flag's, would read a setting the user never gave."""
    import dataclasses

    import cli
    import finetune
    import runlength
    import selftrain
    import train

    flags = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    for kind in (finetune.NetworkFlags, runlength.LengthFlags, selftrain.SelfTrainingFlags):
        for field in dataclasses.fields(kind):
            assert field.name in flags and field.default == flags[field.name], (kind.__name__, field.name)
    cfg = train.TrainConfig(minutes=5, height=32)
    assert cli.section(cfg, runlength.LengthFlags).minutes == 5 and cli.section(cfg, finetune.NetworkFlags).height == 32
