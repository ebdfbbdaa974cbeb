"""The docs check: every command shown in README.md and docs/*.md is exercised.

Commands are read from fenced code blocks (```bash, ```sh, ```shell, ```console, and blocks
without a language whose lines start with `$ `; after `$ ` lines the other lines are the
command's output). Each command must be either

- in RUN: this test runs it as written (in a scratch folder that links the repository's
  configs/ and tools/, with the environment's bin/ first on PATH), and a console block's output
  must be what it prints; or
- in COVERED: too expensive to run here (training, Slurm, a GPU, real data sets): the table names
  the test that runs it, which must exist.

On top of that every command, fenced or inline (`llip-train ...` in the text), gets the static
check: its program exists and can be run as written (a `tools/x.py` shown without `python` has
its run bit and a shebang), a make target is defined, and every `--flag` it uses is in the
program's `--help` (in the script's text for shell scripts). Placeholders (CONFIG, RUN_DIR, ...)
are fine there. A new command without coverage fails test_every_command_is_covered with one line
naming the command and where it is.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- reading the pages

class Command:
    def __init__(self, page: Path, line: int, text: str, output: list[str] | None, fenced: bool):
        self.page, self.line, self.text, self.output, self.fenced = page, line, text, output, fenced

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"

    def __repr__(self) -> str:
        return f"{self.where}: {self.text}"


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _norm(text: str) -> str:
    return " ".join(text.split())


def fenced_commands(page: Path) -> list[Command]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        block = lines[start:end]
        i = end + 1
        if lang not in SHELL_LANGS and lang != "":
            continue
        prompted = any(ln.startswith("$ ") for ln in block)
        if lang == "" and not prompted:
            continue
        j = 0
        while j < len(block):
            raw = block[j]
            if prompted and not raw.startswith("$ "):
                j += 1
                continue
            first = start + j + 1  # 1-based line number in the page
            text = raw[2:] if prompted else raw
            while text.rstrip().endswith("\\") and j + 1 < len(block):
                j += 1
                text = text.rstrip()[:-1] + " " + block[j].strip()
            j += 1
            text = _strip_comment(text)
            if not text.strip():
                continue
            output = None
            if prompted:
                output = []
                while j < len(block) and not block[j].startswith("$ "):
                    output.append(block[j])
                    j += 1
            out.append(Command(page, first, _norm(text), output, True))
    return out


# Inline code spans that are commands: they start with one of our programs.
INLINE = re.compile(r"^(llip-(train|launch|eval)\b|python (tools/|-m llip_scale)|tools/\S+\.(py|sh)\b|make \w)")


def inline_commands(page: Path) -> list[Command]:
    out = []
    in_fence = False
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if INLINE.match(span.strip()):
                out.append(Command(page, n, _norm(span), None, False))
    return out


ALL_FENCED = [c for p in PAGES for c in fenced_commands(p)]
ALL_INLINE = [c for p in PAGES for c in inline_commands(p)]


# ---------------------------------------------------------------- what covers each command

def _demo_data(cwd: Path, request) -> None:
    """data/demo, as `make demo` leaves it (a small set from the same tool)."""
    (cwd / "data").mkdir()
    (cwd / "data" / "demo").symlink_to(request.getfixturevalue("demo_data"))


def _photos(cwd: Path, request) -> None:
    """A folder of captioned images in the layout tools/make_shards.py reads."""
    from shardgen import image_bytes

    for i in range(3):
        (cwd / "photos").mkdir(exist_ok=True)
        (cwd / "photos" / f"img{i}.png").write_bytes(image_bytes(i))
        (cwd / "photos" / f"img{i}.txt").write_text(f"a photo number {i}\n")


# Run here, as written. Values: what the scratch folder needs first, and whether it is slow (a
# process start with torch and DeepSpeed imports takes seconds on a busy machine: the fast tier
# runs the cheapest, the full suite all of them).
RUN: dict[str, dict] = {
    "llip-train configs/models/tiny.yaml steps=100 model.vision.width=64 optim.lr=1e-3 --print-config": {},
    "python tools/model_summary.py all": {"slow": True},  # test_tool_models runs the tool in process
    "python tools/model_summary.py b16 --kind siglip": {"slow": True},
    "python tools/model_summary.py configs/official/llip_l14_k32.yaml --json": {"slow": True},
    "python tools/make_shards.py photos/ shards/ --per-shard 1000": {"setup": _photos},
    "python tools/profile_pooler.py --memory-plan": {},
    "python tools/profile_pooler.py --device cpu --quick --out bench_cpu": {"slow": True},
    "llip-launch configs/experiments/demo.yaml launcher.kind=slurm launcher.tasks_per_node=2 --dry-run": {
        "setup": _demo_data},
    "tools/plan_memory.py configs/experiments/llip_g14.yaml --world-size 256 --gpu-mem 80": {},
    "tools/plan_memory.py configs/experiments/{llip,siglip,clip}_{b32,b16,l14}.yaml --world-size 128": {"slow": True},
    "tools/plan_memory.py configs/experiments/{llip,siglip,clip}_{h14,g14}.yaml --world-size 256": {"slow": True},
    "python tools/flops_table.py": {"slow": True},  # test_scale_flops runs it too
}

# Too expensive to run here: the test that runs it (or what it does), and why not here.
COVERED: dict[str, tuple[str, str]] = {
    "make demo": ("tests/test_cli_errors.py::test_the_demo_checks_the_batch_split_before_training",
                  "six minutes of two-process training; the test runs its entry point, llip_scale.demo"),
    "make test": ("", "the whole suite, which includes this file; CI runs it (.ci/run)"),
    "make test-fast": ("", "the suite without the slow tests, which includes this file"),
    "make lint": ("", "ruff over the repository; CI runs it (.ci/run)"),
    "make test ARGS='-m slurm'": ("tests/test_slurm.py::test_time_limit_saves_requeues_and_resumes_exactly",
                                  "a real Slurm, as root"),
    "make test ARGS=\"tests/test_checkpoint.py --durations=10\"": ("", "runs a test file of the suite"),
    "python tools/make_demo_data.py data/demo": (
        "tests/test_data_tools.py::test_demo_data_is_deterministic_and_feeds_the_tiny_model",
        "16k scenes; the test makes a smaller set with the same tool"),
    "python tools/train_tokenizer.py captions.txt \"shards/shard-{000000..000099}.tar\" --out tokenizer.model "
    "--vocab-size 32000": ("tests/test_data_tokenizer.py::test_train_tokenizer_tool_reads_text_jsonl_and_shards",
                           "needs a real caption corpus"),
    "llip-eval runs/llip_b16 --dataset imagenet1k=/data/imagenet --dataset cifar100=/data/cifar "
    "--dataset coco=/data/coco --json results.json --markdown results.md": (
        "tests/test_eval_benchmarks.py::test_llip_eval_datasets_table_json_and_progress", "real data sets"),
    "llip-eval out/llip_b16_k32 --bpe-vocab bpe_simple_vocab_16e6.txt.gz --dataset imagenet-a=/data/imagenet-a": (
        "tests/test_eval_benchmarks.py::test_llip_eval_on_an_imported_official_checkpoint_finds_its_bpe_file",
        "a real checkpoint and data set"),
    "python tools/reproduce_small.py": (
        "tests/test_reproduce_small.py::test_every_variant_and_seed_is_trained_and_summarised", "70 minutes of training"),
    "python tools/reproduce_small.py --methods llip --set model.head.tau=1 --runs runs/tau1 --out tau1.md": (
        "tests/test_reproduce_small.py::test_a_rerun_reuses_the_runs_and_keeps_the_notes", "training runs"),
    "python tools/import_official.py CHECKPOINT OUT_DIR [--config CONFIG] [--dtype bf16] [--bpe-vocab FILE]": (
        "tests/test_scale_official.py::test_converted_checkpoint_reproduces_the_official_formulas",
        "an official checkpoint"),
    "python tools/export_checkpoint.py RUN OUT_DIR": (
        "tests/test_train_equivalence.py::test_export_tool_and_load_pretrained", "a trained run"),
    "python tools/export_checkpoint.py RUN/checkpoints/step_0000010000 OUT_DIR [--tokenizer tok.model]": (
        "tests/test_train_webdataset.py::test_an_export_carries_its_tokenizer_and_preprocessing", "a trained run"),
    "python tools/kernel_resources.py --chosen": (
        "tests/test_kernel_compile.py::test_chosen_kernels_compile_for_sm90_and_sm80_without_spills",
        "compiles every kernel the backend launches for the zoo, for sm_90 and sm_80; the test, for tiny"),
    "tools/gpu_check.sh gpu_results": ("tests/test_gpu_check.py::test_gpu_check_without_cuda_fails_with_one_line",
                                       "a GPU; runs the gpu tests and the profile (the test: its one line without one)"),
    "tools/gpu_dry_run.sh": ("tests/test_gpu_check.py::test_a_skipped_kernel_test_is_a_failure",
                             "builds a virtualenv with another Triton and compiles every kernel the GPU tests launch"),
    "llip-launch configs/experiments/llip_g14.yaml run_dir=/checkpoint/me/llip_g14 launcher.kind=slurm "
    "launcher.nodes=32 launcher.gpus_per_node=8 launcher.partition=learn launcher.time=72:00:00 "
    "launcher.signal_delay_s=300": ("tests/test_launch_config.py::test_dry_run_sbatch_has_the_requested_resources",
                                    "a Slurm cluster; the test checks the sbatch script of such a launch"),
    "eval \"$(tools/slurm_local.sh env)\"": (
        "tests/test_slurm.py::test_preemption_with_term_resumes_exactly", "a real Slurm, as root"),
    "llip-launch configs/experiments/demo.yaml launcher.kind=slurm launcher.tasks_per_node=2 "
    "launcher.cpus_per_task=1 launcher.time=60 --wait": (
        "tests/test_slurm.py::test_preemption_with_term_resumes_exactly", "a real Slurm, as root"),
    "sbatch -p urgent --exclusive --wrap true": (
        "tests/test_slurm.py::test_preemption_with_term_resumes_exactly", "a real Slurm, as root"),
    "tools/slurm_local.sh stop": ("tests/test_slurm.py::test_preemption_with_term_resumes_exactly",
                                  "a real Slurm, as root"),
    "tools/slurm_local.sh start --nodes 2": (
        "tests/test_slurm_multinode.py::test_slurm_local_runs_two_nodes_and_stop_leaves_nothing_behind",
        "a real Slurm with network namespaces, as root"),
    "tools/slurm_local.sh status": (
        "tests/test_slurm_multinode.py::test_slurm_local_runs_two_nodes_and_stop_leaves_nothing_behind",
        "a real Slurm with network namespaces, as root"),
    "llip-launch configs/experiments/demo.yaml launcher.kind=slurm launcher.nodes=2 launcher.tasks_per_node=1 "
    "launcher.cpus_per_task=1 launcher.time=60 --wait": (
        "tests/test_slurm_multinode.py::test_two_nodes_train_exactly_like_two_tasks_on_one_node",
        "a real 2-node Slurm, as root"),
    "llip-train CONFIG [key.path=value ...]": (
        "tests/test_cli_errors.py::test_a_log_file_receives_each_progress_line_as_it_happens", "training"),
    "llip-train CONFIG [key.path=value ...] --nproc 8": (
        "tests/test_cli_errors.py::test_shards_that_are_all_bad_end_in_one_line_per_rank", "8 processes"),
    "torchrun --standalone --nproc_per_node 8 -m llip_scale.train CONFIG ...": (
        "tests/test_train_resume.py::test_uninterrupted_runs_finish", "8 processes; the test uses 2"),
    "llip-train --verify-checkpoint RUN/checkpoints/step_0000010000": (
        "tests/test_train_resume.py::test_verify_checkpoint_names_the_damaged_file", "a trained run"),
    "python tools/bench_train.py configs/experiments/demo.yaml --steps 60": (
        "", "a benchmark: two training runs of 60 steps (`make bench`)"),
}

# Programs that are not this project's: only their place in the tables is checked.
EXTERNAL = {"eval", "sbatch", "tensorboard", "torchrun"}


# ---------------------------------------------------------------- the static check

def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def program(text: str) -> tuple[list[str], list[str]]:
    """(how to run the program, its arguments) of a command; [] for another project's program."""
    words = _tokens(text)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words or words[0] in EXTERNAL:
        if words[:1] == ["torchrun"] and "-m" in words:  # the module torchrun runs is ours
            k = words.index("-m")
            return [sys.executable, "-m", words[k + 1]], words[k + 2:]
        return [], []
    if words[0] == "make":
        return ["make"], words[1:]
    if words[0] == "python" and words[1:2] == ["-m"]:
        return [sys.executable, "-m", words[2]], words[3:]
    if words[0] == "python":
        return [sys.executable, words[1]], words[2:]
    return [words[0]], words[1:]


def _flags(args: list[str]) -> list[str]:
    out = []
    for a in args:
        a = a.strip("[]")
        if re.match(r"^--[A-Za-z][\w-]*", a):
            out.append(a.split("=", 1)[0])
    return out


def _entry(prog: tuple[str, ...]):
    """The function a program runs, called with its argument list: a console script's entry
    point, a script's ``cli`` or ``main``."""
    if len(prog) == 1:
        (ep,) = importlib.metadata.entry_points(group="console_scripts", name=prog[0])
        return ep.load()
    else:
        name = f"_docs_tool_{Path(prog[1]).stem}"
        spec = importlib.util.spec_from_file_location(name, prog[1])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses in a script look their module up
        spec.loader.exec_module(module)
    return getattr(module, "cli", None) or module.main


@functools.lru_cache(maxsize=None)
def help_text(prog: tuple[str, ...]) -> str:
    """What the program's --help prints (the script itself for a shell script). Scripts and
    console scripts are asked in this process (argparse prints the help and exits before the
    program does anything); a module run with -m in a process of its own, as its __main__ runs."""
    if prog[-1].endswith(".sh"):
        return (REPO / prog[-1]).read_text()
    if prog[1:2] == ("-m",):
        proc = subprocess.run([*prog, "--help"], cwd=REPO, env=_env(), capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(prog[1:])} --help failed:\n{proc.stderr[-2000:]}"
        return proc.stdout
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # a real text stream: some reconfigure it
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        _entry(prog)(["--help"])
    assert done.value.code in (0, None), f"{' '.join(prog)} --help failed"
    out.flush()
    return out.buffer.getvalue().decode()


def _env() -> dict:
    from _train_helpers import run_env

    env = run_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def static_problems(cmd: Command) -> list[str]:
    prog, args = program(cmd.text)
    if not prog:
        return []
    where = f"{cmd.where}: `{cmd.text}`"
    if prog == ["make"]:
        makefile = (REPO / "Makefile").read_text()
        targets = [a for a in args if "=" not in a]
        return [f"{where}: make has no target '{t}'" for t in targets
                if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    if prog[0] == sys.executable and prog[1] == "-m":
        try:
            found = importlib.util.find_spec(prog[2]) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            return [f"{where}: no module {prog[2]}"]
    elif prog[-1].startswith("tools/"):
        script = REPO / prog[-1]
        if not script.is_file():
            return [f"{where}: {prog[-1]} does not exist"]
        if len(prog) == 1 and not (os.access(script, os.X_OK) and script.read_text().startswith("#!")):
            return [f"{where}: {prog[-1]} is shown as a program but has no run bit or no #! line"]
        prog = [sys.executable, str(script)] if script.suffix == ".py" else [prog[-1]]
    elif shutil.which(prog[0], path=_env()["PATH"]) is None:
        return [f"{where}: no program '{prog[0]}' in {BIN} or on PATH"]
    flags = _flags(args)
    if not flags:
        return []
    text = help_text(tuple(prog))
    name = Path(prog[-1]).relative_to(REPO).as_posix() if Path(prog[-1]).is_absolute() else prog[-1]
    return [f"{where}: {name} does not take {f}" for f in flags
            if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


# ---------------------------------------------------------------- the tests

def test_commands_are_found():
    """The reader sees the commands of every page (it would pass vacuously otherwise)."""
    pages = {c.page.name for c in ALL_FENCED}
    assert {"README.md", "training-and-configs.md", "data.md", "launching-and-preemption.md", "evaluation.md",
            "kernels-and-profiling.md", "scale-and-memory.md", "interop.md"} <= pages
    sample = Command(REPO / "README.md", 1, "", None, True)
    assert _strip_comment('echo "a # b" # c') == 'echo "a # b"'
    assert program("python -m llip_scale.train X --nproc 2") == ([sys.executable, "-m", "llip_scale.train"],
                                                                 ["X", "--nproc", "2"])
    assert _flags(["[--gpu-mem", "80]", "--out=x", "-m"]) == ["--gpu-mem", "--out"]
    assert sample.where == "README.md:1"


def uncovered(commands: list[Command]) -> list[str]:
    return [f"{c.where}: `{c.text}` is neither run nor covered: add it to RUN or COVERED in tests/test_docs.py"
            for c in commands if c.text not in RUN and c.text not in COVERED]


def test_every_command_is_covered():
    lines = uncovered(ALL_FENCED)
    assert not lines, "\n" + "\n".join(lines)


def test_a_new_command_without_coverage_is_named_with_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```bash\nmake demo   # covered\nllip-train new.yaml \\\n    --print-config\n```\n\n"
                    "```\n$ python tools/model_summary.py all\nmodel ...\n```\n\n```python\nimport os\n```\n")
    found = fenced_commands(page)
    assert [(c.line, c.text, c.output) for c in found] == [
        (4, "make demo", None), (5, "llip-train new.yaml --print-config", None),
        (10, "python tools/model_summary.py all", ["model ..."])]
    lines = uncovered(found)
    assert len(lines) == 1 and lines[0].startswith(f"{page}:5: `llip-train new.yaml --print-config` is neither")


def test_the_tables_name_only_commands_the_docs_show():
    shown = {c.text for c in ALL_FENCED}
    stale = [k for k in [*RUN, *COVERED] if k not in shown]
    assert not stale, "no longer in the docs (remove from tests/test_docs.py): " + "; ".join(stale)


def test_the_tests_named_in_covered_exist():
    missing = []
    for cmd, (test, why) in COVERED.items():
        assert why, cmd
        if not test:
            continue
        path, _, name = test.partition("::")
        if not (REPO / path).is_file() or (name and not re.search(rf"^def {re.escape(name)}\(",
                                                                    (REPO / path).read_text(), re.M)):
            missing.append(f"{test} (for `{cmd}`)")
    assert not missing, "no such test: " + "; ".join(missing)


def test_every_command_runs_as_written_in_form():
    """Program there and runnable as shown, make targets defined, every --flag accepted."""
    problems = [p for c in ALL_FENCED + ALL_INLINE for p in static_problems(c)]
    assert not problems, "\n" + "\n".join(problems)


def _run_params():
    for c in ALL_FENCED:
        if c.text in RUN:
            marks = [pytest.mark.slow] if RUN[c.text].get("slow") else []
            yield pytest.param(c, id=c.where, marks=marks)


@pytest.mark.parametrize("cmd", list(_run_params()))
def test_command_runs(cmd, tmp_path, request):
    """The command, run as written from a folder that has the repository's configs/ and tools/,
    succeeds; a console block's output is what it prints, a printed table is on the page."""
    for name in ["configs", "tools"]:
        (tmp_path / name).symlink_to(REPO / name)
    setup = RUN[cmd.text].get("setup")
    if setup:
        setup(tmp_path, request)
    proc = subprocess.run(["bash", "-c", cmd.text], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd.where}: `{cmd.text}` failed:\n{proc.stderr[-3000:]}"
    printed = [ln.rstrip() for ln in proc.stdout.splitlines()]
    if cmd.output:
        assert printed == [ln.rstrip() for ln in cmd.output], f"{cmd.where}: the output shown is not what it prints"
    page = cmd.page.read_text(encoding="utf-8")
    if printed and printed[0].startswith("|"):
        missing = [ln for ln in printed if ln not in page]
        assert not missing, f"{cmd.where}: the page's table differs from what it prints: {missing[:3]}"


# ---------------------------------------------------------------- links and names

def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+://", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                if not dest.exists():
                    bad.append(f"{page.relative_to(REPO)}:{n}: {target} does not exist")
                elif anchor and dest.suffix == ".md":
                    slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), re.M)}
                    if anchor not in slugs:
                        bad.append(f"{page.relative_to(REPO)}:{n}: no heading #{anchor} in {dest.name}")
    assert not bad, "\n" + "\n".join(bad)


def test_module_names_and_paths_in_the_docs_exist():
    """`llip_scale.x.y` names import (a module, then attributes), and so do the names of
    `from llip_scale.x import a, b` lines; `llip_scale/x/y.py` paths exist."""
    bad = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            names = re.findall(r"\b(llip_scale(?:\.\w+)+)", line)
            imported = re.match(r"^\s*from (llip_scale[\w.]*) import ([\w, ]+)", line)
            if imported:
                names += [f"{imported.group(1)}.{a.strip()}" for a in imported.group(2).split(",") if a.strip()]
            for name in names:
                parts = name.split(".")
                for k in range(len(parts), 0, -1):
                    try:
                        obj = importlib.import_module(".".join(parts[:k]))
                        break
                    except ImportError:
                        continue
                try:
                    for attr in parts[k:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    bad.append(f"{page.relative_to(REPO)}:{n}: {name}")
            for path in re.findall(r"\b((?:llip_scale|kernels|launchers|tools)/[\w/]+\.(?:py|sh))\b", line):
                if not (REPO / path).is_file():
                    bad.append(f"{page.relative_to(REPO)}:{n}: {path}")
    assert not bad, "not found:\n" + "\n".join(bad)


if __name__ == "__main__":  # list the commands the check sees
    for c in ALL_FENCED:
        print(repr(c))
    print("--- inline")
    for c in ALL_INLINE:
        print(repr(c))
