"""fidelity.bench.source_at: the committed text of a file at a revision, not the working
tree's (what the A/B benchmarks set beside the current code)."""

import subprocess

from fidelity.bench import source_at


def test_source_at_returns_the_committed_text_and_short_commit(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("old = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (tmp_path / "a.py").write_text("new = 2\n")  # the working tree moved on
    commit, text = source_at(tmp_path, "HEAD", "a.py")
    assert text == "old = 1\n"
    assert commit == git("rev-parse", "--short", "HEAD")
