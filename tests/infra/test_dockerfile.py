"""infra/Dockerfile: both variants resolve to the right bases, torch is the pinned build, the user is not root,
the lock agrees with pyproject.toml, and hadolint/shellcheck pass when installed. Nothing is built here."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Instruction:
    cmd: str        # upper-case keyword
    args: str       # rest of the logical line, continuations joined
    line: int       # 1-based line of the keyword


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comments/blank lines dropped, continuations joined, whitespace runs collapsed."""
    out: list[Instruction] = []
    buf, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction are ignored
            continue
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(cmd.upper(), " ".join(args.split()), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


@dataclass
class Stage:
    base: str
    name: str | None
    body: list[Instruction]


def stages(instrs: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages in order."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instrs:
        if ins.cmd == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.I)
            assert m, f"line {ins.line}: cannot parse FROM {ins.args}"
            result.append(Stage(m.group(1), m.group(2), []))
        elif not result:
            assert ins.cmd == "ARG", f"line {ins.line}: only ARG may precede FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default.strip('"')
        else:
            result[-1].body.append(ins)
    return global_args, result


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def stage_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.body:
        if ins.cmd == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', ins.args):
                env[key] = value.strip('"')
    return env


def resolve(variant: str, target: str, global_args: dict[str, str], all_stages: list[Stage]) -> list[Stage]:
    """Chain of stages from `target` down to its external base image, for --build-arg VARIANT=variant."""
    args = {**global_args, "VARIANT": variant}
    by_name = {s.name: s for s in all_stages if s.name}
    chain = [by_name[target]]
    while (base := expand(chain[-1].base, args)) in by_name:
        chain.append(by_name[base])
    return chain


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dockerfile(infra: Path) -> list[Instruction]:
    return parse_dockerfile((infra / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def parsed(dockerfile):
    return stages(dockerfile)


# ----------------------------------------------------------------------------- tests
def test_parser_joins_continuations_and_skips_comments():
    instrs = parse_dockerfile("# c\nARG A=1\nFROM x:1 AS b\nRUN a \\\n  # note\n  && b\nUSER 1000:1000\n")
    assert [(i.cmd, i.args) for i in instrs] == [("ARG", "A=1"), ("FROM", "x:1 AS b"), ("RUN", "a && b"),
                                                 ("USER", "1000:1000")]


def test_variant_arg_defaults_to_cpu(parsed):
    global_args, _ = parsed
    assert global_args.get("VARIANT") == "cpu"


@pytest.mark.parametrize("variant,base_prefix,flavour", [
    ("cpu", "debian:", "cpu"),
    ("cuda", "nvidia/cuda:12.8", "cu128"),
])
def test_variants_resolve_to_their_bases(parsed, variant, base_prefix, flavour):
    global_args, all_stages = parsed
    for target in ("builder", "runtime"):
        chain = resolve(variant, target, global_args, all_stages)
        external = expand(chain[-1].base, {**global_args, "VARIANT": variant})
        assert external.startswith(base_prefix), f"{variant}/{target} resolves to {external}"
        env = {}
        for stage in reversed(chain):
            env.update(stage_env(stage))
        assert env["TORCH_FLAVOUR"] == flavour
        if variant == "cuda":
            # torch's CUDA build and the base image's CUDA toolkit (nvcc for DeepSpeed ops) must agree.
            cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", external)
            assert f"cu{cuda.group(1)}{cuda.group(2)}" == flavour
    # The builder and runtime of one variant share the distro, so compiled DeepSpeed ops find the same glibc.
    distro = {t: re.search(r"(ubuntu\d+\.\d+|bookworm)", expand(resolve(variant, t, global_args, all_stages)[-1].base,
                                                                   {"VARIANT": variant})).group(1)
              for t in ("builder", "runtime")}
    assert distro["builder"] == distro["runtime"]


def test_base_images_are_tagged(parsed):
    global_args, all_stages = parsed
    names = {s.name for s in all_stages}
    for stage in all_stages:
        base = expand(stage.base, global_args)
        if "${" in base or base in names:
            continue
        assert re.search(r":[\w.-]+$|@sha256:", base) and not base.endswith(":latest"), f"untagged base {base}"


def test_torch_is_the_pinned_variant_build(dockerfile, parsed, exact_pins):
    _, all_stages = parsed
    builder = next(s for s in all_stages if s.name == "builder")
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in builder.body if i.cmd == "ARG"}
    assert args["TORCH_VERSION"] == exact_pins["torch"], "Dockerfile TORCH_VERSION != pyproject torch pin"
    runs = " ".join(i.args for i in builder.body if i.cmd == "RUN")
    assert '"torch==${TORCH_VERSION}+${TORCH_FLAVOUR}"' in runs
    assert "https://download.pytorch.org/whl/${TORCH_FLAVOUR}" in runs
    # The build fails if anything later replaced the variant's torch build.
    assert "wrong torch build" in runs
    # Dependencies come through the lock, the project itself without re-resolving.
    assert "-c /src/infra/constraints.txt" in runs and "--no-deps" in runs


def test_runtime_runs_as_non_root(parsed):
    _, all_stages = parsed
    final = all_stages[-1]
    assert final.name == "runtime", "the runtime stage must be last (the default build target)"
    users = [i.args for i in final.body if i.cmd == "USER"]
    assert users, "runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"
    creates = " ".join(i.args for i in final.body if i.cmd == "RUN")
    assert re.search(r"useradd --uid \"\$\{USER_UID\}\"", creates)
    arg_uid = next(i.args.split("=")[1] for i in final.body if i.cmd == "ARG" and i.args.startswith("USER_UID="))
    assert arg_uid == uid


def test_entrypoint_and_cmd_are_exec_form(parsed):
    _, all_stages = parsed
    final = {i.cmd: i.args for i in all_stages[-1].body}
    assert final["ENTRYPOINT"] == '["/usr/bin/tini", "--"]'
    assert final["CMD"].startswith('["vitpipe"')
    # KubeRay and the cluster launcher start Ray through login shells that reset PATH.
    assert "/etc/profile.d/" in " ".join(i.args for i in all_stages[-1].body if i.cmd == "RUN")


def test_version_label_matches_pyproject(parsed, pyproject):
    _, all_stages = parsed
    final = all_stages[-1]
    arg = next(i.args for i in final.body if i.cmd == "ARG" and i.args.startswith("VITPIPE_VERSION="))
    assert arg.split("=", 1)[1] == pyproject["project"]["version"]


def test_copied_sources_exist(dockerfile, repo):
    for ins in dockerfile:
        if ins.cmd != "COPY" or ins.args.startswith("--from"):
            continue
        *sources, _dest = ins.args.split()
        for src in sources:
            if src != ".":
                assert (repo / src).exists(), f"line {ins.line}: COPY source {src} is missing"


def test_constraints_agree_with_pyproject(infra, pyproject, exact_pins):
    lock = {}
    for line in (infra / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            lock[name.strip().lower().replace("_", "-")] = version.strip()
    for name, version in exact_pins.items():
        if name == "torch":
            continue
        assert lock.get(name) == version, f"constraints.txt has {name}=={lock.get(name)}, pyproject pins {version}"
    for req in pyproject["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
        assert name == "torch" or name in lock, f"{name} missing from constraints.txt: run infra/lock.sh"
    extras = [l.strip() for l in (infra / "requirements-image.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for name in extras:
        assert name.lower() in lock, f"image extra {name} missing from constraints.txt: run infra/lock.sh"
    assert not [n for n in lock if n == "torch" or n.startswith("nvidia-") or n == "triton"], \
        "torch and its CUDA wheels must come from the variant's PyTorch index, not the lock"


def test_dockerignore_keeps_secrets_and_state_out(infra):
    patterns = {l.strip() for l in (infra / "Dockerfile.dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")}
    for required in ("**/.git", "**/.venv", "**/.env", "runs/", "mlruns/", "**/__pycache__"):
        assert required in patterns, f"Dockerfile.dockerignore should exclude {required}"
    assert "!**/.env.example" in patterns
    for needed in ("pyproject.toml", "README.md", "models", "pipeline", "jobs", "infra"):
        assert not any(p.strip("/*") == needed for p in patterns), f"{needed} is needed in the build context"


def test_build_script_tags_match_manifests(infra, image_for):
    script = (infra / "build.sh").read_text()
    assert 'tag="${IMAGE_REPO}:${version}-${variant}"' in script
    assert "--build-arg \"VARIANT=${variant}\"" in script
    for rel in ("k8s/raycluster.yaml", "k8s/rayjob.yaml", "ray/cluster.yaml"):
        images = set(re.findall(r"image:\s*(\S+)", (infra / rel).read_text()))
        assert images == {image_for("cuda")}, f"{rel} uses {images}"


def test_hadolint(tool, infra):
    hadolint = tool("hadolint")
    for dockerfile in (infra / "Dockerfile", infra / "mlflow" / "Dockerfile"):
        proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck(tool, infra):
    shellcheck = tool("shellcheck")
    scripts = sorted(infra.rglob("*.sh"))
    assert scripts
    proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_variant_check_catches_cuda_mismatch(infra):
    """A CUDA base that disagrees with torch's cu128 build is caught by the resolution above."""
    text = (infra / "Dockerfile").read_text().replace("nvidia/cuda:12.8.1-devel", "nvidia/cuda:12.4.1-devel")
    global_args, all_stages = stages(parse_dockerfile(text))
    with pytest.raises(AssertionError):
        test_variants_resolve_to_their_bases((global_args, all_stages), "cuda", "nvidia/cuda:12.8", "cu128")
