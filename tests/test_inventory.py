"""A folder's inventory names every file lost, truncated or changed since it was taken."""

from __future__ import annotations

from common.inventory import inventory_problems, take_inventory


def test_inventory_names_missing_truncated_and_changed_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"a" * 100)
    (tmp_path / "sub" / "b.pt").write_bytes(b"b" * 50)
    (tmp_path / "c.pt").write_bytes(b"c" * 10)
    (tmp_path / "marker.json").write_text("{}")
    inventory = take_inventory(tmp_path, exclude=frozenset({"marker.json"}))
    assert sorted(inventory) == ["a.pt", "c.pt", "sub/b.pt"]
    assert inventory_problems(tmp_path, inventory) == []

    (tmp_path / "a.pt").write_bytes(b"a" * 60)  # truncated
    (tmp_path / "sub" / "b.pt").unlink()  # lost
    (tmp_path / "c.pt").write_bytes(b"C" * 10)  # same size, other bytes
    assert inventory_problems(tmp_path, inventory) == [
        "a.pt: 60 bytes, 100 recorded",
        "c.pt: sha256 differs from the one recorded",
        "sub/b.pt: missing",
    ]
    assert inventory_problems(tmp_path, inventory, checksums=False) == [
        "a.pt: 60 bytes, 100 recorded",
        "sub/b.pt: missing",
    ]
