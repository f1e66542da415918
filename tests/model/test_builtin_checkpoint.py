"""Runs without --ckpt reuse one built-in checkpoint from the user cache (no 66 MB copy per run in /tmp)."""

from pytest_duquant.policies import session


def test_the_builtin_checkpoint_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DUQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(session, "_BUILTIN_DIRS", {})
    first = session.builtin_checkpoint_dir()
    assert (tmp_path / "cache") in first.parents and (first / session.WEIGHTS_NAME).is_file()
    stamp = (first / session.WEIGHTS_NAME).stat().st_mtime_ns
    monkeypatch.setattr(session, "_BUILTIN_DIRS", {})  # as a new process would
    again = session.builtin_checkpoint_dir()
    assert again == first and (again / session.WEIGHTS_NAME).stat().st_mtime_ns == stamp  # not rewritten
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp folders left
    # written by older generating code: replaced, not accumulated
    stale = tmp_path / "cache" / "dummy-seed0-000000000000"
    stale.mkdir()
    monkeypatch.setattr(session, "_generator_digest", lambda: "111111111111")
    monkeypatch.setattr(session, "_BUILTIN_DIRS", {})
    newer = session.builtin_checkpoint_dir()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [newer.name]
