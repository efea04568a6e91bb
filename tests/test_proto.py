"""The committed stubs are what `make proto` makes from proto/ today."""

from server.proto.gen import stale_files


def test_generated_stubs_are_current():
    assert stale_files() == [], "run `make proto` and commit the result"
