"""Grids of pipeline runs (``vitpipe sweep``): axes of dotted config keys -> points, each point a full pipeline run
with its own config, nested under one MLflow sweep run; identical stages across points run once (stage keys).

Axes. ``--grid KEY=V1,V2`` adds an axis; the points are the product of the axes, first axis slowest. A key
starting with ``+`` moves together with the previous axis (same number of values): ``--grid model=mu/4,Ti/4
--grid +pretrain.lr=1e-3,8e-4`` is two points, not four. Values are split on commas outside brackets and quotes
(``finetune.lr_grid=[0.01,0.03],[0.1]``). A ViT variant name for a model section (``model=Ti/4``) swaps the
architecture (width, depth, MLP, heads, patch, hybrid stem) and keeps the recipe's other model fields
(resolution, head, dropout): a size axis compares sizes at the recipe's resolution.

Record. ``<store>/sweeps/<sweep_id>/sweep.json``: the recipe, the axes, the base config, and per point its
coordinates, run id, MLflow run and status; ``resume_sweep`` reruns the points that did not finish, each as
another attempt of its own run (``vitpipe resume`` semantics: every finished stage is reused).

Execution (``sweep_exec``): one point at a time on this machine; on a cluster as many at once as its resources
hold, a point never starting while another point is producing a stage it needs. The sweep's report
(``sweep_report``) makes the figures and the table from the finished points.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from vitpipe.jobs.config import RECIPES, PipelineConfig, ResolvedConfig, resolve_paths
from vitpipe.jobs.core.configtools import ConfigError, apply_overrides, from_dict
from vitpipe.jobs.core.store import Store, exists, read_json, write_json_atomic
from vitpipe.jobs.run.graph import plan
from vitpipe.jobs.stages import stages_for
from vitpipe.models import ViTConfig
from vitpipe.models.config import decode_variant
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.run.graph import PlanItem

SWEEP_FILE = "sweep.json"
DONE = "FINISHED"


# ------------------------------------------------------------------------------------------------ axes -> points
@dataclass(frozen=True)
class Axis:
    """One axis of the grid: the keys that move together and, per step, one raw value per key."""

    keys: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "values": [list(v) for v in self.values]}

    @classmethod
    def from_dict(cls, d: dict) -> Axis:
        return cls(keys=tuple(d["keys"]), values=tuple(tuple(v) for v in d["values"]))


def split_values(text: str) -> list[str]:
    """``"a,[1,2],'x,y'"`` -> ``["a", "[1,2]", "x,y"]``: commas inside brackets or quotes do not split."""
    out, buf, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                buf.append(ch)
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
            buf.append(ch)
        elif ch in "])}":
            depth -= 1
            buf.append(ch)
        elif ch == "," and depth == 0:
            out.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    if quote or depth:
        raise ConfigError(f"unbalanced brackets or quotes in grid values '{text}'")
    out.append("".join(buf).strip())
    return out


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    """``--grid`` arguments -> axes (module doc); ConfigError naming the argument when malformed."""
    axes: list[Axis] = []
    seen: set[str] = set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        linked = key.startswith("+")
        key = key.lstrip("+").strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"bad --grid '{spec}': expected KEY=V1,V2,... (or +KEY=... to move with the previous)")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"--grid {key}: empty value in '{raw}'")
        if key in seen:
            raise ConfigError(f"--grid {key}: the key is on two axes")
        seen.add(key)
        if linked:
            if not axes:
                raise ConfigError(f"--grid +{key}: '+' links an axis to the previous --grid, and there is none")
            prev = axes[-1]
            if len(values) != len(prev.values):
                raise ConfigError(f"--grid +{key}: {len(values)} values, but the axis it moves with "
                                  f"({', '.join(prev.keys)}) has {len(prev.values)}")
            axes[-1] = Axis(keys=(*prev.keys, key), values=tuple((*p, v) for p, v in zip(prev.values, values)))
        else:
            axes.append(Axis(keys=(key,), values=tuple((v,) for v in values)))
    return axes


def grid_coords(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """The points of the grid as ``{key: raw value}``, the product of the axes (first axis slowest)."""
    out = []
    for steps in itertools.product(*[a.values for a in axes]):
        coords: dict[str, str] = {}
        for axis, vals in zip(axes, steps):
            coords.update(zip(axis.keys, vals))
        out.append(coords)
    return out


def default_grid(recipe: str) -> tuple[str, ...]:
    """The ``--grid`` arguments a recipe suggests (its function's ``sweep_grid``), () when none."""
    fn = RECIPES.get(recipe)
    return tuple(getattr(fn, "sweep_grid", ()) or ())


def swap_variant(base: ViTConfig, name: str) -> ViTConfig:
    """``base`` with the architecture of variant ``name`` and every other field kept (module doc)."""
    try:
        arch = decode_variant(name)
    except ValueError as e:
        raise ConfigError(f"invalid model variant: {e}") from None
    if "patch_size" not in arch:
        raise ConfigError(f"model variant '{name}' names no patch size; write e.g. '{name}/16'")
    arch.setdefault("hybrid", None)
    try:
        return dataclasses.replace(base, **arch)
    except ValueError as e:
        raise ConfigError(f"model={name}: {e}") from None


def apply_coords(cfg: PipelineConfig, coords: dict[str, str]) -> PipelineConfig:
    """``cfg`` with a point's coordinates applied in axis order (as ``--set``, except variant names for a model
    section: ``swap_variant``), relative paths made absolute. A coordinate that is invalid on its own is applied
    after the others (``model.width=64`` needs the point's ``model.num_heads=2`` first): a point's values only
    have to be valid together."""
    todo = list(coords.items())
    while todo:
        before, errors = len(todo), []
        for key, raw in list(todo):
            try:
                cfg = _apply_one(cfg, key, raw)
                todo.remove((key, raw))
            except ConfigError as e:
                errors.append(e)
        if len(todo) == before:
            raise errors[0]
    return resolve_paths(cfg)


def _apply_one(cfg: PipelineConfig, key: str, raw: str) -> PipelineConfig:
    parts = key.split(".")
    target = cfg
    for p in parts:
        target = getattr(target, p, None)
    if isinstance(target, ViTConfig):
        return _replace_path(cfg, parts, swap_variant(target, raw))
    return apply_overrides(cfg, [f"{key}={raw}"])


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    return dataclasses.replace(obj, **{parts[0]: _replace_path(getattr(obj, parts[0]), parts[1:], value)})


# ------------------------------------------------------------------------------------------------ points
@dataclass
class Point:
    """One grid point: its coordinates, config and run, and where it stands."""

    index: int
    coords: dict[str, str]
    cfg: PipelineConfig
    run_id: str
    status: str = "PENDING"
    """PENDING (not started), RUNNING, FINISHED, FAILED or KILLED."""
    mlflow_run_id: str | None = None
    error: str | None = None
    seconds: float | None = None

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.coords.items()) or "(base config)"

    def to_dict(self) -> dict:
        return {"index": self.index, "coords": dict(self.coords), "run_id": self.run_id, "status": self.status,
                "mlflow_run_id": self.mlflow_run_id, "error": self.error, "seconds": self.seconds}


def new_id(prefix: str = "") -> str:
    return prefix + _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def make_points(base: PipelineConfig, axes: Sequence[Axis]) -> list[Point]:
    """One point per grid coordinate, each with its own run id; ConfigError naming the point on a bad value."""
    points = []
    for i, coords in enumerate(grid_coords(axes)):
        try:
            cfg = apply_coords(base, coords)
        except ConfigError as e:
            raise ConfigError(f"sweep point {i} ({' '.join(f'{k}={v}' for k, v in coords.items())}): {e}") from None
        points.append(Point(index=i, coords=coords, cfg=cfg, run_id=new_id()))
    return points


def point_plans(points: Sequence[Point]) -> list[list[tuple[PlanItem, str]]]:
    """Each point's stage plan with a status per stage: ``cached``, ``to run``, ``forced`` or ``shared`` (to run,
    but an earlier point of this sweep runs the same key: it will be cached by then)."""
    first: dict[tuple[str, str], int] = {}
    out = []
    for pt in points:
        rows = []
        for it in plan(pt.cfg, stages_for(pt.cfg), Store(pt.cfg.store)):
            key = (it.stage.name, it.key)
            status = it.status
            if it.will_run:
                if key in first and first[key] != pt.index:
                    status = "shared"
                first.setdefault(key, pt.index)
            rows.append((it, status))
        out.append(rows)
    return out


def dry_run_lines(points: Sequence[Point]) -> list[str]:
    """One line per point (coordinates, each stage's status) and a total: what ``--dry-run`` prints."""
    plans = point_plans(points)
    lines = []
    for pt, rows in zip(points, plans):
        stages = ", ".join(f"{it.stage.name}:{st}" for it, st in rows)
        lines.append(f"[{pt.index}] {pt.label}  |  {stages}")
    runs = sum(1 for rows in plans for _, st in rows if st in ("to run", "forced"))
    shared = sum(1 for rows in plans for _, st in rows if st == "shared")
    cached = sum(1 for rows in plans for _, st in rows if st == "cached")
    lines.append(f"{len(points)} points: {runs} stage runs, {shared} shared with an earlier point, {cached} cached")
    return lines


def claims(points: Sequence[Point]) -> dict[int, set[tuple[str, str]]]:
    """Per point, the (stage, key) pairs it would run now: two points claiming one pair must not run at once."""
    return {pt.index: {(it.stage.name, it.key) for it, st in rows if st in ("to run", "forced", "shared")}
            for pt, rows in zip(points, point_plans(points))}


# ------------------------------------------------------------------------------------------------ the record
@dataclass
class Sweep:
    """A sweep as stored in ``sweep.json`` (plus the typed configs of its points)."""

    sweep_id: str
    recipe: str
    axes: list[Axis]
    base: PipelineConfig
    points: list[Point]
    grid: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    status: str = "RUNNING"
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    started: str = ""
    finished: str | None = None
    report: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return Store(self.base.store)

    @property
    def url(self) -> str:
        return sweep_url(self.store, self.sweep_id)

    @property
    def coord_keys(self) -> list[str]:
        return [k for a in self.axes for k in a.keys]

    def to_dict(self) -> dict:
        return {"sweep_id": self.sweep_id, "recipe": self.recipe, "grid": list(self.grid), "sets": list(self.sets),
                "axes": [a.to_dict() for a in self.axes], "config": ResolvedConfig.of(self.base).public,
                "status": self.status, "mlflow_run_id": self.mlflow_run_id, "tracking_uri": self.tracking_uri,
                "started": self.started, "finished": self.finished, "report": dict(self.report),
                "points": [p.to_dict() for p in self.points]}

    def save(self) -> None:
        write_json_atomic(self.url, self.to_dict())


def sweep_url(store: Store, sweep_id: str) -> str:
    return join_url(store.root, "sweeps", sweep_id, SWEEP_FILE)


def load_sweep(store: str, sweep_id: str) -> Sweep:
    """The stored sweep; each point's config is its run's stored config when the run started, else the base
    config with its coordinates."""
    st = Store(store)
    url = sweep_url(st, sweep_id)
    if not exists(url):
        raise FileNotFoundError(f"no sweep '{sweep_id}' in store {st.root} (sweeps live in <store>/sweeps/)")
    d = read_json(url)
    base = from_dict(PipelineConfig, d["config"])
    points = []
    for p in d["points"]:
        run_url = st.run_url(p["run_id"])
        cfg = (from_dict(PipelineConfig, read_json(run_url)["config"]) if exists(run_url)
               else apply_coords(base, p["coords"]))
        points.append(Point(index=p["index"], coords=p["coords"], cfg=cfg, run_id=p["run_id"], status=p["status"],
                            mlflow_run_id=p.get("mlflow_run_id"), error=p.get("error"), seconds=p.get("seconds")))
    return Sweep(sweep_id=d["sweep_id"], recipe=d["recipe"], axes=[Axis.from_dict(a) for a in d["axes"]], base=base,
                 points=points, grid=d.get("grid", []), sets=d.get("sets", []), status=d["status"],
                 mlflow_run_id=d.get("mlflow_run_id"), tracking_uri=d.get("tracking_uri"),
                 started=d.get("started", ""), finished=d.get("finished"), report=d.get("report", {}))


def new_sweep(recipe: str, base: PipelineConfig, grid: Sequence[str], sets: Sequence[str] = (),
              sweep_id: str | None = None) -> Sweep:
    """A sweep of ``recipe`` (``base``: the recipe with ``sets`` applied) over ``grid`` (``--grid`` arguments)."""
    axes = parse_grid(grid)
    if not axes:
        raise ConfigError(f"sweep {recipe}: no --grid given and the recipe suggests none")
    points = make_points(base, axes)
    return Sweep(sweep_id=sweep_id or new_id("sweep-"), recipe=recipe, axes=axes, base=base, points=points,
                 grid=list(grid), sets=list(sets), started=_dt.datetime.now().isoformat(timespec="seconds"))


def resume_command(sw: Sweep) -> str:
    return f"vitpipe sweep --resume {sw.sweep_id} --store {sw.store.root}"
