"""Checkpoint files: atomic writes."""


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    import os

    from noisecraft.io.checkpoint import save_json
    path = save_json({"a": 1}, tmp_path / "c.json")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
