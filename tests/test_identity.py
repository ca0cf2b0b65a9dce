"""Identity of a run's data: another vocabulary or other shards are named before any step."""

from __future__ import annotations

import pytest

from pipeline.identity import DataIdentity, IdentityError, check_resume, check_same_vocabulary


def manifest(vocab: str, shard_hashes: list[str]) -> dict:
    shards = [{"name": f"shard-{i:05d}.h5", "sha256": h} for i, h in enumerate(shard_hashes)]
    return {"attributes": {"vocab_sha256": vocab}, "shards": shards}


def test_same_folder_content_same_identity_wherever_it_lies():
    a = DataIdentity.of_manifest("data/a", manifest("v1", ["x", "y"]))
    b = DataIdentity.of_manifest("/mnt/copy", manifest("v1", ["x", "y"]))
    assert a.shards_sha256 == b.shards_sha256 and a.vocab_sha256 == b.vocab_sha256
    assert DataIdentity.of_manifest("a", manifest("v1", ["x", "z"])).shards_sha256 != a.shards_sha256


def test_eval_shards_of_another_vocabulary_are_refused_naming_both():
    train = DataIdentity.of_manifest("data/train", manifest("a" * 64, ["x"]))
    check_same_vocabulary(train, DataIdentity.of_manifest("data/eval", manifest("a" * 64, ["y"])))
    with pytest.raises(IdentityError, match=r"data/eval: the evaluation shards were made with another vocabulary"):
        check_same_vocabulary(train, DataIdentity.of_manifest("data/eval", manifest("b" * 64, ["y"])))


def test_resume_on_other_vocabulary_is_refused_and_other_shards_need_new_data():
    saved = DataIdentity.of_manifest("data/train", manifest("v1", ["x", "y"])).to_dict()
    same = DataIdentity.of_manifest("moved/train", manifest("v1", ["x", "y"]))
    assert check_resume("ck/step-1", saved, same, new_data=False) is None
    other_vocab = DataIdentity.of_manifest("data/other", manifest("v2", ["x", "y"]))
    with pytest.raises(IdentityError, match="embeddings index the other vocabulary"):
        check_resume("ck/step-1", saved, other_vocab, new_data=True)
    other_shards = DataIdentity.of_manifest("data/more", manifest("v1", ["x", "z"]))
    with pytest.raises(IdentityError, match="pass --new-data"):
        check_resume("ck/step-1", saved, other_shards, new_data=False)
    assert "from their first example" in check_resume("ck/step-1", saved, other_shards, new_data=True)
    assert check_resume("ck/step-1", None, other_shards, new_data=False) is None
