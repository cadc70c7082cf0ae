"""tests/shared_data.py: a missing shared data folder skips a test on a developer's machine and
fails it under CI, naming the path; a present one is returned."""

from __future__ import annotations

import pytest

from tests.shared_data import require_shared_data


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A shared data folder with one weights file and one image folder; CI variables cleared."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(b"x")
    (tmp_path / "viper" / "images").mkdir(parents=True)
    monkeypatch.setenv("HPC_REID_SHARED_DATA", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("HPC_REID_REQUIRE_DATA", raising=False)
    return tmp_path


def test_present_file_and_folder_are_returned_from_the_overridden_root(shared):
    assert require_shared_data("weights/w.pth") == shared / "weights" / "w.pth"
    assert require_shared_data("viper/images", directory=True) == shared / "viper" / "images"


def test_missing_data_skips_outside_ci_naming_the_path(shared):
    with pytest.raises(pytest.skip.Exception, match=str(shared / "weights" / "other.pth")):
        require_shared_data("weights/other.pth")


@pytest.mark.parametrize("env", [("CI", "true"), ("HPC_REID_REQUIRE_DATA", "1")])
def test_missing_data_fails_under_ci_naming_the_path(shared, monkeypatch, env):
    monkeypatch.setenv(*env)
    with pytest.raises(pytest.fail.Exception) as info:
        require_shared_data("ilids/images", directory=True)
    assert str(shared / "ilids" / "images") in str(info.value)
    assert "CI=true or HPC_REID_REQUIRE_DATA=1" in str(info.value)


def test_a_file_where_a_folder_is_expected_counts_as_missing(shared, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="folder"):
        require_shared_data("weights/w.pth", directory=True)
    with pytest.raises(pytest.fail.Exception, match="file"):
        require_shared_data("viper/images")


def test_ci_set_to_another_value_still_skips(shared, monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data("weights/other.pth")
