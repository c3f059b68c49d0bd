"""The blind index tools (issue 10) given wrong arguments by an operator under pressure: a
typed error or a usage exit (2), and nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text

from migrations_helpers import search_index
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.errors import ConfigurationError

from .test_search_index import TABLE, Base, _database_url, app_module, seed, setup

__all__ = ["app_module"]  # the fixture, used by name


def _states(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("select domain, phase, slot, version from cmk_search_indexes"))
        )


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_wrong_arguments_change_nothing(
    engine: Engine, app_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, _ = setup(engine, app_module.cmk)
    seed(plain, 2)
    name = app_module.__name__
    base = ["--database-url", _database_url(engine), "--metadata", f"{name}:Base"]
    keys = ["--cmk", f"{name}:cmk", "--index", f"{TABLE}.email_bidx", "--no-progress"]

    def run(*argv: str) -> tuple[int | str | None, str]:
        capsys.readouterr()
        try:
            code: int | str | None = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        return code, capsys.readouterr().err

    before = _states(engine)
    for bad in (
        ["--settle", "inf"],
        ["--settle", "nan"],
        ["--settle", "-1"],
        ["--progress-every", "-1"],
        ["--progress-every", "nan"],
    ):
        for command in ("build", "rotate"):
            code, err = run("search", command, *base, *keys, *bad)
            assert code == 2, (command, bad, err)
            assert _states(engine) == before, (command, bad)
    code, err = run("search", "status", "--database-url", "nope://x", "--metadata", f"{name}:Base")
    assert code == 2 and "invalid database URL" in err


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("settle", [float("inf"), float("nan"), -1.0])
def test_a_settle_that_is_not_a_finite_number_is_refused_before_anything(
    engine: Engine, app_module: Any, settle: float
) -> None:
    plain, _ = setup(engine, app_module.cmk)
    seed(plain, 2)
    before = _states(engine)
    for tool in (search_index.build_index, search_index.rotate_index):
        with pytest.raises(ConfigurationError, match="settle"):
            tool(engine, app_module.cmk, Base.metadata, f"{TABLE}.email_bidx", settle=settle)
        assert _states(engine) == before
