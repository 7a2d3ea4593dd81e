"""The read-only CLI listings: whole rows even when the output is piped (not a terminal)."""

from __future__ import annotations

from typer.testing import CliRunner

from vitpipe.jobs.cli import app


def test_models_lists_every_variant_with_exact_params_and_flops() -> None:
    res = CliRunner().invoke(app, ["models"])  # stdout is not a terminal here, as with `vitpipe models | less`
    assert res.exit_code == 0, res.output
    rows = {ln.split("│")[1].strip(): ln for ln in res.output.splitlines() if ln.startswith("│")}
    assert {"Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32", "H/14"} <= set(rows)
    assert "86,567,656" in rows["B/16"] and "17.56" in rows["B/16"]  # paper-exact params, ≈17.6 GMACs
    assert "304,326,632" in rows["L/16"] and "632,045,800" in rows["H/14"]
    assert "…" not in res.output  # nothing cut to fit an 80-column default


def test_models_at_another_resolution_scales_the_flops() -> None:
    res = CliRunner().invoke(app, ["models", "--img-size", "384"])
    assert res.exit_code == 0, res.output
    b16 = next(ln for ln in res.output.splitlines() if ln.startswith("│ B/16 "))
    assert "577" in b16  # 24×24 patches + class token
    assert "86,859,496" in b16  # the position embedding grows with the grid
    assert "H/14" in res.output.splitlines()[-1]  # 384 is no multiple of 14: named, not a crash


def test_models_rejects_a_resolution_no_variant_fits() -> None:
    res = CliRunner().invoke(app, ["models", "--img-size", "-3"])
    assert res.exit_code == 2 and "error: --img-size must be positive" in res.output
