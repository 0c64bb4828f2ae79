"""The CI pipeline files: the GitHub workflow passes actionlint, the GitLab files have the
structure GitLab needs, and every `invoke` command they run is a real task with real flags."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from vm import ci
from vm.settings import load

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
GITLAB = ROOT / ".gitlab-ci.yml"
GITLAB_TEMPLATES = ROOT / ci.GITLAB_TEMPLATES
PIPELINE_FILES = [WORKFLOW, GITLAB, GITLAB_TEMPLATES]
#: GitLab's top-level keywords (what is neither a job nor a hidden key)
GITLAB_GLOBALS = {"stages", "variables", "default", "include", "workflow", "image", "services", "cache",
                  "before_script", "after_script", "spec"}


def test_actionlint_passes_on_the_workflow():
    exe = shutil.which("actionlint")
    assert exe, "actionlint is not installed: run ./setup.sh (pyproject.toml pins it)"
    res = subprocess.run([exe, "-no-color", str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The check has teeth: a job that needs an unknown job and an unknown context are reported."""
    bad = tmp_path / ".github" / "workflows" / "ci.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(WORKFLOW.read_text().replace("    needs: plan\n", "    needs: plna\n")
                   .replace("${{ github.run_id }}", "${{ gihtub.run_id }}"))
    res = subprocess.run([shutil.which("actionlint") or "actionlint", "-no-color", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "plna" in res.stdout and "gihtub" in res.stdout, res.stdout


def _jobs(doc: dict) -> dict[str, dict]:
    return {k: v for k, v in doc.items() if k not in GITLAB_GLOBALS}


def _script(job: dict, key: str = "script") -> list[str]:
    def flat(items):
        for item in items or ():
            yield from (flat(item) if isinstance(item, list) else [item])
    return list(flat(job.get(key)))


def _check_gitlab(doc: dict, templates: dict[str, dict]) -> list[str]:
    """Problems with a GitLab pipeline document (the structure GitLab itself rejects)."""
    problems, stages = [], doc.get("stages", ["build", "test", "deploy"])
    for name, job in _jobs(doc).items():
        if name.startswith(".") and not isinstance(job, dict):
            continue                                    # a YAML anchor, not a template
        if not isinstance(job, dict):
            problems.append(f"{name}: not a mapping")
            continue
        merged = {**templates.get(job.get("extends", ""), {}), **job}
        if "extends" in job and job["extends"] not in templates:
            problems.append(f"{name}: extends unknown {job['extends']}")
        if name.startswith("."):
            continue
        if merged.get("stage", "test") not in stages:
            problems.append(f"{name}: stage {merged.get('stage')} not in {stages}")
        if "trigger" not in merged and not _script(merged):
            problems.append(f"{name}: no script")
        if not all(isinstance(line, str) for line in _script(merged) + _script(merged, "after_script")):
            problems.append(f"{name}: a script line is not a string")
        for need in merged.get("needs", ()):
            if (need if isinstance(need, str) else need["job"]) not in doc:
                problems.append(f"{name}: needs unknown job {need}")
    return problems


def test_gitlab_parent_pipeline_structure():
    doc = yaml.safe_load(GITLAB.read_text())
    assert _check_gitlab(doc, {}) == []
    plan = doc["plan"]
    assert "shards.yml" in plan["artifacts"]["paths"]
    assert any("invoke ci --list-shards --gitlab" in line for line in _script(plan))
    trigger = doc["shards"]["trigger"]
    assert trigger["include"] == [{"artifact": "shards.yml", "job": "plan"}]
    assert trigger["strategy"] == "depend"


def test_gitlab_child_pipeline_structure():
    """The child pipeline the harness prints, with the templates it includes, is a valid
    pipeline: every shard job on a KVM runner, JUnit reports, results kept on failure."""
    child = ci.gitlab_pipeline(load())
    assert child["include"] == [{"local": ci.GITLAB_TEMPLATES}]
    templates = yaml.safe_load(GITLAB_TEMPLATES.read_text())
    doc = {**templates, **{k: v for k, v in child.items() if k != "include"}}
    assert _check_gitlab(doc, {k: v for k, v in templates.items() if k.startswith(".")}) == []
    shard = templates[".shard"]
    assert "kvm" in shard["tags"]
    assert shard["artifacts"]["when"] == "always"
    assert all(p.startswith("results/shards/$SHARD/") for p in shard["artifacts"]["reports"]["junit"])
    assert child["shard"]["parallel"]["matrix"] == [
        {"SHARD": [sh.name for sh in ci.shards(ci.plan(load()))]}]
    assert templates[".merge"]["when"] == "always"
    assert templates[".merge"]["stage"] == templates["stages"][-1]


def test_the_structure_check_has_teeth():
    doc = {"stages": ["a"], "j": {"stage": "b", "script": ["x", 3], "needs": ["nope"]}}
    assert len(_check_gitlab(doc, {})) == 3


# --- every invoke command the pipelines run -------------------------------------------

def _shell_lines() -> list[tuple[str, str]]:
    """``(file, shell text)`` of every step and script line the pipeline files run."""
    found = []
    for job in yaml.safe_load(WORKFLOW.read_text())["jobs"].values():
        found += [(WORKFLOW, step["run"]) for step in job["steps"] if "run" in step]
    for path in (GITLAB, GITLAB_TEMPLATES):
        for job in _jobs(yaml.safe_load(path.read_text())).values():
            if isinstance(job, dict):
                found += [(path, line) for key in ("before_script", "script", "after_script")
                          for line in _script(job, key)]
            elif isinstance(job, list):          # a YAML anchor of script lines
                found += [(path, line) for line in _script({"script": job})]
    return [(p.relative_to(ROOT).as_posix(), text) for p, text in found]


def _command_words(rest: str) -> list[str]:
    """The words of one command, up to the first ``&& ; | >``; a trailing quote that closes
    a ``bash -c '...'`` string around it is dropped."""
    if rest.count("'") % 2:
        rest = rest[:rest.rindex("'")]
    lexer = shlex.shlex(re.sub(r"\$\{\{[^}]*\}\}|\$\{?\w+\}?", "VALUE", rest), posix=True,
                        punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if set(word) <= set("&;|<>()"):
            break
        words.append(word)
    return words


def invoke_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every `invoke ...` the pipeline files run."""
    found = []
    for where, text in _shell_lines():
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for m in re.finditer(r"(?<![\w/.-])invoke\s+(.*)$", line):
                command = shlex.join(["invoke", *_command_words(m.group(1))])
                if (where, command) not in found:
                    found.append((where, command))
    return found


@lru_cache(maxsize=None)
def task_help(task: str) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "invoke", "--help", task], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_the_pipelines_run_invoke():
    files = {f for f, _ in invoke_commands()}
    assert files == {p.relative_to(ROOT).as_posix() for p in PIPELINE_FILES}
    assert len(invoke_commands()) >= 5


def command_problems(command: str) -> list[str]:
    """Why ``invoke TASK --flag ...`` would not run: no such task, or a flag it does not have."""
    words = shlex.split(command)[1:]
    task, flags = words[0], [w.split("=", 1)[0] for w in words[1:] if w.startswith("-")]
    rc, text = task_help(task)
    if rc != 0:
        return [f"`invoke {task}` is no task: {text.strip()}"]
    return [f"`invoke {task}` has no {flag}" for flag in flags
            if not re.search(rf"(^|\s|,){re.escape(flag)}([=\s,]|$)", text, re.M)]


@pytest.mark.parametrize("where,command", invoke_commands(), ids=[f"{f}:{c}" for f, c in invoke_commands()])
def test_every_invoke_command_is_a_real_task_with_real_flags(where, command):
    assert command_problems(command) == [], where


@pytest.mark.parametrize("command,problem", [
    ("invoke ci --shrad unit", "has no --shrad"), ("invoke merge-reports x", "is no task"),
    ("invoke report --merge a --outdir b", "has no --outdir"),
], ids=["misspelled-flag", "unknown-task", "unknown-flag"])
def test_the_command_check_has_teeth(command, problem):
    assert any(problem in p for p in command_problems(command))


def test_the_flag_variables_hold_real_flags():
    """$TIER_FLAG / $OVL_TIER_FLAG / $OVL_FULL are "" or --full, a flag of `invoke ci`."""
    text = "\n".join(p.read_text() for p in PIPELINE_FILES) + str(ci.gitlab_pipeline(load(), full=True))
    assert "'--full'" in text and "--full" in task_help("ci")[1]
