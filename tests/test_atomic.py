"""tfdp/atomic.py: `first_missing`, `staged_directory`, `write_bytes` /
`write_text` and `require_new_or_empty`.

A staged directory appears at its target whole or not at all: on success the
build is renamed into place (replacing an empty directory there); a target
that is not empty, or an exception in the block, leaves the target as it
was and removes the staging directory and every parent made for the target.
"""

from __future__ import annotations

import os

import pytest

from tfdp.atomic import (first_missing, require_new_or_empty, staged_directory, write_bytes,
                         write_text)
from tfdp.errors import UserError


def _listing(root):
    """Every path under `root`, relative, sorted (directories end in /)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirnames]
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
    return sorted(out)


# first_missing

def test_first_missing_of_an_existing_path_is_none(tmp_path):
    (tmp_path / "a").mkdir()
    assert first_missing(str(tmp_path)) is None
    assert first_missing(str(tmp_path / "a")) is None


def test_first_missing_is_the_outermost_missing_directory(tmp_path):
    assert first_missing(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a")
    (tmp_path / "a").mkdir()
    assert first_missing(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a" / "b")
    (tmp_path / "a" / "b").mkdir()
    assert first_missing(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a" / "b" / "c")


def test_first_missing_of_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert first_missing(os.path.join("x", "y", "z")) == "x"
    os.mkdir("x")
    assert first_missing(os.path.join("x", "y", "z")) == os.path.join("x", "y")


def test_first_missing_of_the_empty_path_is_none():
    assert first_missing("") is None


def test_first_missing_treats_an_existing_file_as_existing(tmp_path):
    (tmp_path / "f").write_text("x")
    assert first_missing(str(tmp_path / "f")) is None


# staged_directory: success

def test_success_renames_the_build_into_place_and_leaves_no_staging(tmp_path):
    target = tmp_path / "out"
    with staged_directory(str(target)) as build:
        assert not os.path.exists(build)  # the block creates it
        assert not target.exists()  # nothing at the target while building
        os.makedirs(os.path.join(build, "sub"))
        with open(os.path.join(build, "sub", "file.txt"), "w") as f:
            f.write("hello")
    assert (target / "sub" / "file.txt").read_text() == "hello"
    assert os.listdir(tmp_path) == ["out"]  # no .tfdp-staging-* left beside it


def test_staging_is_hidden_beside_the_target_with_the_prefix(tmp_path):
    target = tmp_path / "out"
    with staged_directory(str(target), prefix=".my-prefix-") as build:
        staging = os.path.dirname(build)
        assert os.path.dirname(staging) == str(tmp_path)  # same file system: atomic rename
        assert os.path.basename(staging).startswith(".my-prefix-")
        os.mkdir(build)
    assert os.listdir(tmp_path) == ["out"]


def test_success_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with staged_directory(str(target)) as build:
        os.mkdir(build)
        open(os.path.join(build, "x"), "w").close()
    assert _listing(tmp_path) == ["a/", "a/b/", "a/b/out/", "a/b/out/x"]


def test_relative_target_lands_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with staged_directory(os.path.join("rel", "out")) as build:
        assert os.path.isabs(build)
        os.mkdir(build)
    assert (tmp_path / "rel" / "out").is_dir()


def test_existing_empty_target_directory_is_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with staged_directory(str(target)) as build:
        os.mkdir(build)
        with open(os.path.join(build, "new"), "w") as f:
            f.write("1")
    assert _listing(target) == ["new"]
    assert os.listdir(tmp_path) == ["out"]


def test_target_gets_normal_permissions_not_mkdtemp_0700(tmp_path):
    umask = os.umask(0o022)
    try:
        with staged_directory(str(tmp_path / "out")) as build:
            os.mkdir(build)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# staged_directory: failure

def test_non_empty_target_fails_and_is_left_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("keep me")
    with pytest.raises(OSError):
        with staged_directory(str(target)) as build:
            os.mkdir(build)
            with open(os.path.join(build, "new"), "w") as f:
                f.write("replacement")
    assert _listing(target) == ["old"]
    assert (target / "old").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["out"]  # the staging directory is gone


def test_existing_file_at_the_target_fails_and_is_left_untouched(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(OSError):
        with staged_directory(str(target)) as build:
            os.mkdir(build)
    assert target.read_text() == "a file"
    assert os.listdir(tmp_path) == ["out"]


def test_exception_removes_staging_and_the_parents_it_created(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "sibling").write_text("s")
    target = tmp_path / "keep" / "new1" / "new2" / "out"

    class Boom(Exception):
        pass
    with pytest.raises(Boom) as raised:
        with staged_directory(str(target)) as build:
            assert (tmp_path / "keep" / "new1" / "new2").is_dir()  # made for the staging dir
            os.makedirs(os.path.join(build, "deep"))
            open(os.path.join(build, "deep", "f"), "w").close()
            raise Boom("half-way")
    assert str(raised.value) == "half-way"  # the block's own exception propagates
    # new1 (and so new2) removed; the directory that existed before, and its
    # other contents, stay.
    assert _listing(tmp_path) == ["keep/", "keep/sibling"]


def test_exception_with_an_existing_parent_removes_only_the_staging(tmp_path):
    (tmp_path / "other").write_text("o")
    with pytest.raises(KeyboardInterrupt):  # BaseException, not just Exception
        with staged_directory(str(tmp_path / "out")) as build:
            os.mkdir(build)
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["other"]


def test_exception_leaves_an_existing_empty_target_in_place(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(RuntimeError):
        with staged_directory(str(target)) as build:
            os.mkdir(build)
            raise RuntimeError("no")
    assert target.is_dir() and not os.listdir(target)
    assert os.listdir(tmp_path) == ["out"]


def test_a_block_that_builds_nothing_gives_an_empty_directory(tmp_path):
    with staged_directory(str(tmp_path / "a" / "out")):
        pass
    assert os.listdir(tmp_path / "a") == ["out"] and os.listdir(tmp_path / "a" / "out") == []


def test_a_block_that_builds_nothing_publishes_an_empty_directory(tmp_path):
    """The existing empty target is never left missing: the block's (empty)
    result replaces it."""
    target = tmp_path / "out"
    target.mkdir()
    with staged_directory(str(target)):
        pass
    assert target.is_dir() and os.listdir(target) == []
    assert os.listdir(tmp_path) == ["out"]


# write_bytes / write_text

def test_write_replaces_a_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "metrics.json"
    write_text(str(path), "old")
    write_text(str(path), "näw ✓")
    assert path.read_bytes() == "näw ✓".encode("utf-8")  # UTF-8 whatever the locale
    write_bytes(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_staged_one(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")

    def broken(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        write_text(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_written_files_get_the_umasks_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(str(tmp_path / "report.html"), "<html>")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644


# require_new_or_empty

def test_new_or_empty_is_accepted_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert require_new_or_empty("new", "--output") == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert require_new_or_empty("empty", "--output") == str(tmp_path / "empty")
    assert not (tmp_path / "new").exists()  # only looks


def test_a_file_or_a_non_empty_directory_is_refused_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--output_dir=.*file is a file, not a directory; "
                                        "choose a new directory$"):
        require_new_or_empty(str(tmp_path / "file"), "--output_dir")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".hidden").write_text("x")
    with pytest.raises(UserError, match=r"^--output=.*full exists and is not empty; choose a "
                                        r"new or empty directory \(nothing in that one"):
        require_new_or_empty(str(tmp_path / "full"), "--output")
