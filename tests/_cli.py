"""What every CLI error test asserts: a user error is exit status 2 and one line on stderr, never a traceback."""

from __future__ import annotations


def one_line_error(capsys, rc: int, *needles: str) -> str:
    """Assert ``rc == 2`` and that stderr is one line without a traceback containing every ``needle``; return it."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err
