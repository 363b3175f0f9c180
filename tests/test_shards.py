import io
import json
import tarfile

import pytest

from soho.data.shards import DataError, SkipCounter, expand_urls, read_shard, shuffle, stream_samples


def write_shard(path, keys):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            payload = json.dumps({"image_id": key}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    for shard in range(5):
        write_shard(tmp_path / f"part-{shard:03d}.tar", [f"s{shard}_{i}" for i in range(7)])
    return tmp_path


def keys_of(samples):
    return [s["__key__"] for s in samples]


def test_expand_urls_forms(shards):
    assert len(expand_urls(str(shards))) == 5
    assert len(expand_urls(str(shards / "part-{000..002}.tar"))) == 3
    assert len(expand_urls(str(shards / "part-*.tar"))) == 5
    assert len(expand_urls([str(shards / "part-000.tar"), str(shards / "part-001.tar")])) == 2
    with pytest.raises(DataError, match="part-008"):
        expand_urls(str(shards / "part-{008..009}.tar"))


@pytest.mark.parametrize("num_shards", [5, 2])
def test_two_ranks_two_workers_read_every_sample_once(tmp_path, num_shards):
    for shard in range(num_shards):
        write_shard(tmp_path / f"p{shard}.tar", [f"s{shard}_{i}" for i in range(7)])
    urls = expand_urls(str(tmp_path))
    seen = []
    for rank in range(2):
        for worker in range(2):
            seen += keys_of(stream_samples(urls, 0, rank, 2, worker, 2, SkipCounter(), repeat=False))
    assert len(seen) == len(set(seen)) == num_shards * 7


def test_streams_are_deterministic_and_epochs_reshuffle(shards):
    urls = expand_urls(str(shards))
    first = keys_of(stream_samples(urls, 3, 0, 1, 0, 1, SkipCounter(), repeat=False))
    again = keys_of(stream_samples(urls, 3, 0, 1, 0, 1, SkipCounter(), repeat=False))
    assert first == again
    stream = stream_samples(urls, 3, 0, 1, 0, 1, SkipCounter(), repeat=True)
    two_epochs = [next(stream)["__key__"] for _ in range(70)]
    assert sorted(two_epochs[:35]) == sorted(two_epochs[35:]) and two_epochs[:35] != two_epochs[35:]


def test_shuffle_is_a_seeded_permutation():
    items = [{"__key__": str(i)} for i in range(100)]
    a = keys_of(shuffle(iter(items), 10, seed=1))
    assert sorted(a, key=int) == [str(i) for i in range(100)] and a != [str(i) for i in range(100)]
    assert a == keys_of(shuffle(iter(items), 10, seed=1))


def test_truncated_shard_is_counted_not_fatal(shards):
    data = (shards / "part-000.tar").read_bytes()
    (shards / "part-000.tar").write_bytes(data[:1500])
    skips = SkipCounter()
    samples = list(read_shard(str(shards / "part-000.tar"), skips))
    assert len(samples) < 7 and sum(skips.values()) >= 1
