"""tools.maintainers.mutation_check's bugs still fit the code: each line it changes is in its file exactly once
(a refactor that moves a line must move the bug with it), and each bug changes the line."""

import pytest

from tools.maintainers.mutation_check import MUTANTS, ROOT, main

pytestmark = pytest.mark.core


@pytest.mark.parametrize("name,rel,old,new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_every_bug_still_applies(name, rel, old, new):
    assert (ROOT / rel).read_text().count(old) == 1, f"{name}: the line is no longer in {rel} exactly once"
    assert old != new


def test_unknown_bug_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["no such bug"])
    assert "no bug matches" in capsys.readouterr().err
