"""Long jobs report progress (tqdm bars on stderr, shown on a terminal only)."""
import tqdm


class _Recorder:
    """Stands in for tqdm: remembers each bar's description, total and progress."""

    bars: list = []

    def __init__(self, total=None, desc=None, **kwargs):
        self.total, self.desc, self.done, self.lines = total, desc, 0, []
        _Recorder.bars.append(self)

    def update(self, n=1):
        self.done += n

    def write(self, line, file=None):
        self.lines.append(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_scan_counts_the_files_it_reads(lmerge, tiny, tmp_path, monkeypatch):
    _Recorder.bars = []
    monkeypatch.setattr(tqdm, "tqdm", _Recorder)
    for seed in range(3):
        tiny(f"m{seed}.safetensors", seed)
    code, _, _ = lmerge("scan", tmp_path)
    scanning = [bar for bar in _Recorder.bars if bar.desc == "scanning"]
    assert code == 0 and len(scanning) == 1 and scanning[0].done == 3
    assert sorted(scanning[0].lines) == [f"reading {tmp_path / f'm{seed}.safetensors'}" for seed in range(3)]


def test_generate_counts_the_tensors_it_writes(lmerge, tmp_path, monkeypatch):
    from lineage.io.safetensors import SafetensorsFile

    _Recorder.bars = []

    class Iterating(_Recorder):
        def __init__(self, iterable=None, **kwargs):
            super().__init__(**kwargs)
            self.iterable = iterable

        def __iter__(self):
            for item in self.iterable:
                self.update(1)
                yield item

    monkeypatch.setattr(tqdm, "tqdm", Iterating)
    out = tmp_path / "g.safetensors"
    assert lmerge("generate", out, "--size", "tiny")[0] == 0
    with SafetensorsFile(out) as f:
        count = len(f.tensors)
    generating = [bar for bar in _Recorder.bars if bar.desc == "generating"]
    assert len(generating) == 1 and generating[0].total == generating[0].done == count


def test_hash_counts_the_bytes_it_reads(lmerge, tiny, tmp_path, monkeypatch):
    import os

    _Recorder.bars = []
    monkeypatch.setattr(tqdm, "tqdm", _Recorder)
    paths = [tiny(f"h{seed}.safetensors", seed) for seed in range(2)]
    code, _, _ = lmerge("hash", *paths)
    hashing = [bar for bar in _Recorder.bars if bar.desc == "hashing"]
    total = sum(os.path.getsize(p) for p in paths)
    assert code == 0 and len(hashing) == 1 and hashing[0].total == hashing[0].done == total
