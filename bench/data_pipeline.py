"""Host data pipeline throughput, set beside what an accelerator consumes. Prints figures.

  .venv/bin/python bench/data_pipeline.py            # about 4 minutes on 2 cores
  .venv/bin/python bench/data_pipeline.py --quick    # a smoke run

The host is shared, so every figure is a ratio against a baseline timed in the same run,
interleaved with it (image by image, or round by round) and taken as a median over rounds.
Single-thread figures are images per CPU-second of this process (time.process_time: the
threads a call starts count too), which the other processes' load does not dilute.
Pipeline figures are images per second of wall time, and the CPU time of every process
(this one, its Grain workers, their resource tracker) per image: on a loaded host a
pipeline's wall rate follows its share of the cores (more runnable threads, more share),
so the CPU time per image is the cost that carries over to a host of one's own.

1. Decode + resize, one core: ImageNet-like JPEGs (500x375 and 375x500, quality 90) and
   web-sized ones (1024x768) decoded for a target side ~ U(64, 384) (sqrt-area convention),
   at full size or at reduced scale (1/2, 1/4, 1/8, never below the target), then resized,
   with each decoder (config.data.decode.decoder): "auto" (libjpeg-turbo via simplejpeg)
   against "pil".
2. Per-example work in one thread (decode, sample, resize, patchify, token drop, caption,
   tokenize: `Preprocessor` on records already read), interleaved with decode + resize
   alone of the same images: the share of a worker core that goes to anything but decoding
   and resizing. Reading a record (ArrayRecord, global shuffle, Example parsing) is timed
   beside it.
3. The whole host pipeline as training runs it (ArrayRecord shards -> global shuffle ->
   decode -> resolution sampling -> resize -> patchify -> tokenize -> count -> pack, S/16,
   L = 1024, M = 16, B = 8 rows), with 0, 1 and 2 Grain worker processes in interleaved
   rounds; then the same from 4 webdataset tar shards of the same records (streamed, the
   workers splitting the shards: config.data.stream_split "auto"). Images/s counts images
   in the packed batches. With 0 workers the per-example work runs on Grain's read threads
   in this process (decode and resize release the GIL), so it can use both cores; workers
   add the transfer to this process. Each pipeline's CPU time per image is set against the
   in-process pipeline's (what the transfer costs), with the main process's share of it
   (what one main process can serve).
4. Consumption: images/s a train step takes on one accelerator for S/16 and B/16 (image
   tower at the same token counts plus a text tower at T = 64), from the FLOPs per image
   and an assumed sustained rate (default 400 TFLOP/s: an H100 at ~40% of its 989 TFLOP/s
   dense bf16 peak), and the host cores that keep it fed: the 2-worker pipeline's worker
   and main-process CPU time per image (without reduced-scale decode: scaled by part 2).

The corpus holds at least 2048 records (cycling over --images distinct JPEGs): Grain's
global shuffle costs 0.1-0.5 ms a record over fewer than 2000 records, 4 us above.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import tarfile
import tempfile
import time
from statistics import median

import numpy as np
from PIL import Image

from navit_clip.config_loading import load_config
from navit_clip.data import pipeline
from navit_clip.data.decode import open_image
from navit_clip.data.patchify import resize
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.sources.demo import caption_corpus
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.text.tokenizer import train_tokenizer
from navit_clip.variants import parse_variant

PATCH, SEQ_LEN, MAX_IMAGES, ROWS, TEXT_LEN = 16, 1024, 16, 8, 64
MIN_SIDE, MAX_SIDE = 64, 384
MIN_RECORDS = 2048  # Grain's index shuffle is slow below about 2000 records


def photo_like_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
  """A JPEG with photo-like entropy: smooth blobs plus texture noise (about 90 KB)."""
  small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
  noisy = np.clip(base + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def write_corpus(root: str, n: int) -> tuple[dict[str, str], list[bytes]]:
  """max(n, MIN_RECORDS) records over n distinct JPEGs, twice: in 4 ArrayRecord shards and
  in 4 webdataset tar shards (img2dataset's KEY.jpg + KEY.txt); returns {source kind:
  file pattern} and the JPEGs."""
  from array_record.python.array_record_module import ArrayRecordWriter
  rng = np.random.default_rng(0)
  records = max(n, MIN_RECORDS)
  captions = list(caption_corpus(records))
  images = [photo_like_jpeg(rng, *((375, 500) if i % 4 else (500, 375))) for i in range(n)]
  shards = 4
  for s in range(shards):
    writer = ArrayRecordWriter(os.path.join(root, f"data-{s}.array_record"), "group_size:1")
    with tarfile.open(os.path.join(root, f"data-{s}.tar"), "w") as tar:
      for i in range(s, records, shards):
        writer.write(encode_example({"image/encoded": images[i % n], "caption": captions[i],
                                     "example_id": i, "image/format": "jpeg"}))
        for ext, data in (("jpg", images[i % n]), ("txt", captions[i].encode())):
          member = tarfile.TarInfo(f"{i:08d}.{ext}")
          member.size = len(data)
          tar.addfile(member, io.BytesIO(data))
    writer.close()
  return {"arrayrecord": os.path.join(root, "data-*.array_record"),
          "webdataset": os.path.join(root, "data-{0..3}.tar")}, images


def interleaved(fns: dict, items: list, seconds: float, per_round: int = 50
                ) -> dict[str, list[float]]:
  """Items per CPU-second of each function, timed alternately item by item; one figure per
  round of `per_round` items, rounds until `seconds` of wall time have passed."""
  rates = {name: [] for name in fns}
  start, i = time.perf_counter(), 0
  while time.perf_counter() - start < seconds or not rates[next(iter(fns))]:
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(per_round):
      item = items[i % len(items)]
      for name, fn in fns.items():
        t = time.process_time()
        fn(i, item)
        spent[name] += time.process_time() - t
      i += 1
    for name in fns:
      rates[name].append(per_round / max(spent[name], 1e-9))
  return rates


def ratio(a: list[float], b: list[float]) -> float:
  """The median over rounds of a / b."""
  return median([x / y for x, y in zip(a, b)])


def decode_resize(sampler: ResolutionSampler, decoder: str, draft: bool):
  """Decode + resize of encoded bytes number i to a size drawn from (0, i)."""

  def run(i: int, data: bytes) -> np.ndarray:
    opened = open_image(data, decoder=decoder)
    hw = sampler(np.random.default_rng((0, i)), *opened.size_hw)
    return resize(opened.load(hw if draft else None), hw)

  return run


def bench_decode(corpus: dict[str, list[bytes]], seconds: float) -> None:
  sampler = ResolutionSampler(kind="uniform_side", patch_size=PATCH, max_patches=SEQ_LEN,
                              min_side=MIN_SIDE, max_side=MAX_SIDE)
  print(f"\n1. decode + resize to side ~ U({MIN_SIDE}, {MAX_SIDE}), one core, img/s per "
        "CPU-second:")
  print(f"   {'':8s} {'pil full':>9s} {'pil reduced':>11s} {'auto full':>9s} "
        f"{'auto reduced':>12s}   auto/pil (full, reduced)  reduced/full (auto)")
  for name, images in corpus.items():
    fns = {(dec, draft): decode_resize(sampler, dec, draft)
           for dec in ("pil", "auto") for draft in (False, True)}
    r = interleaved(fns, images, seconds, per_round=16)
    full = ratio(r["auto", False], r["pil", False])
    reduced = ratio(r["auto", True], r["pil", True])
    print(f"   {name:8s} {median(r['pil', False]):9.1f} {median(r['pil', True]):11.1f} "
          f"{median(r['auto', False]):9.1f} {median(r['auto', True]):12.1f}   "
          f"{full:8.2f}x {reduced:6.2f}x  {ratio(r['auto', True], r['auto', False]):14.2f}x")


def bench_per_example(config, seconds: float) -> dict[bool, float]:
  """Part 2; returns the per-example work's images per CPU-second by `draft`."""
  records = pipeline.make_records(config, seed=0)
  held = [records[i] for i in range(256)]
  sampler = ResolutionSampler.from_config(config.data.resolution, PATCH, SEQ_LEN)
  print("\n2. per-example work in one thread against decode + resize alone (same images, "
        "same sizes), img/s per CPU-second:")
  per_core = {}
  for draft in (True, False):
    config.data.decode.draft = draft
    preprocess = pipeline.make_preprocessor(config, seed=0)
    alone = decode_resize(sampler, "auto", draft)
    fns = {"work": lambda i, r: preprocess(i, r),
           "alone": lambda i, r: alone(i, bytes(r["image"])),
           "read": lambda i, r: records[i]}
    r = interleaved(fns, held, seconds)
    name = "reduced scale" if draft else "full decode"
    print(f"   {name:13s}: per-example work {median(r['work']):6.1f}, decode + resize "
          f"{median(r['alone']):6.1f}: ratio {ratio(r['work'], r['alone']):.3f}; reading a "
          f"record {1e6 / median(r['read']):.0f} us")
    per_core[draft] = median(r["work"])
  config.data.decode.draft = True
  return per_core


def _children_cpu() -> dict[int, float]:
  """CPU seconds (user + system) of each live child process of this one."""
  tick, cpu = os.sysconf("SC_CLK_TCK"), {}
  for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
    try:
      pids = open(path).read().split()
    except OSError:
      continue
    for pid in pids:
      try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
  return cpu


def bench_pipeline(config, seconds: float) -> tuple[float, float, float, float]:
  """(images/s, CPU seconds per image over all processes and in this one, tokens per
  image) of packed batches after the first batch (warm-up: workers started)."""
  it = iter(pipeline.make_train_dataset(config, process_index=0, process_count=1))
  next(it)
  images = tokens = 0
  kids, own = _children_cpu(), time.process_time()
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    images += int(batch["image_mask"].sum())
    tokens += int((batch["segment_ids"] > 0).sum())
  wall = time.perf_counter() - t0
  after = _children_cpu()
  main = time.process_time() - own
  cpu = main + sum(c - kids.get(p, 0.0) for p, c in after.items())
  if hasattr(it, "close"):
    it.close()
  n = max(images, 1)
  return images / wall, cpu / n, main / n, tokens / n


def bench_pipelines(config, seconds: float, rounds: int) -> tuple[float, float, float]:
  """Part 3 for config.data.source; returns tokens per image and the CPU seconds per image
  of the 2-worker pipeline's workers and of its main process."""
  print(f"\n3. whole host pipeline ({config.data.source} -> packed S/16 batches, L={SEQ_LEN}, "
        f"M={MAX_IMAGES}, B={ROWS}), reduced-scale decode, {rounds} interleaved rounds:")
  counts = (0, 1, 2)
  rates, cpus, mains = ({w: [] for w in counts} for _ in range(3))
  tok = 0.0
  for _ in range(rounds):
    for workers in counts:
      config.data.num_workers = workers
      rate, cpu, main, tok = bench_pipeline(config, seconds)
      rates[workers].append(rate)
      cpus[workers].append(cpu)
      mains[workers].append(main)
  print(f"   {'workers':>7s} {'img/s':>7s} {'/ in-process':>12s} {'CPU ms/img':>10s} "
        f"{'/ in-process':>12s} {'of it main process':>18s}")
  for w in counts:
    print(f"   {w:7d} {median(rates[w]):7.1f} {ratio(rates[w], rates[0]):11.2f}x "
          f"{1e3 * median(cpus[w]):10.2f} {ratio(cpus[w], cpus[0]):11.2f}x "
          f"{1e3 * median(mains[w]):15.2f} ms")
  print(f"   {tok:.1f} tokens/img")
  config.data.num_workers = 0
  return tok, median(cpus[2]) - median(mains[2]), median(mains[2])


def train_flops_per_image(variant: str, text: str, tokens: float, seq_len: int) -> float:
  """Forward + backward matmul FLOPs (3x forward) per image: image tower at `tokens`
  patches in rows of `seq_len` (attention over the whole row), text tower at TEXT_LEN."""

  def per_token(width: int, depth: int, mlp: int, context: int) -> float:
    return depth * 2 * (4 * width * width + 2 * width * mlp + 2 * context * width)

  size, patch = parse_variant(variant)
  img = tokens * (per_token(size.width, size.depth, size.mlp_dim, seq_len)
                  + 2 * patch * patch * 3 * size.width)
  t, _ = parse_variant(text)
  txt = TEXT_LEN * per_token(t.width, t.depth, t.mlp_dim, TEXT_LEN)
  return 3 * (img + txt)


def pipeline_config(files: dict[str, str], tokenizer: str):
  config = load_config("demo")
  config.model.image.variant = "S/16"
  config.model.text.variant = "S"
  config.model.text.max_len = TEXT_LEN
  config.model.text.vocab_size = 64
  d = config.data
  d.source, d.train_files = "arrayrecord", files["arrayrecord"]
  d.tokenizer.path, d.tokenizer.lowercase = tokenizer, True
  d.batch_size, d.seq_len, d.max_images = ROWS, SEQ_LEN, MAX_IMAGES
  d.resolution.kind, d.resolution.min_side, d.resolution.max_side = (
      "uniform_side", MIN_SIDE, MAX_SIDE)
  d.token_drop.kind = "none"
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="short timings")
  parser.add_argument("--images", type=int, default=200, help="distinct JPEGs in the corpus")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved pipeline rounds")
  parser.add_argument("--device-tflops", type=float, default=400.0,
                      help="sustained accelerator TFLOP/s for the consumption figures")
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  seconds = 2.0 if args.quick else 10.0
  rounds = 1 if args.quick else args.rounds
  with tempfile.TemporaryDirectory() as root:
    files, images = write_corpus(root, args.images)
    tokenizer = os.path.join(root, "tok.model")
    train_tokenizer(caption_corpus(4000), 64, tokenizer, lowercase=True)
    print(f"corpus: {max(len(images), MIN_RECORDS)} records over {len(images)} JPEGs, mean "
          f"{np.mean([len(b) for b in images]) / 1e3:.0f} KB, 500x375 / 375x500; side ~ "
          f"U({MIN_SIDE}, {MAX_SIDE}), patch {PATCH}")
    rng = np.random.default_rng(1)
    large = [photo_like_jpeg(rng, 768, 1024) for _ in range(8)]
    bench_decode({"500x375": images, "1024x768": large}, seconds)
    config = pipeline_config(files, tokenizer)
    per_core = bench_per_example(config, seconds)
    tok, worker_cpu, main_cpu = bench_pipelines(config, seconds, rounds)
    config.data.source, config.data.train_files = "webdataset", files["webdataset"]
    bench_pipelines(config, seconds, rounds)
    print(f"\n4. consumption on one accelerator at {args.device_tflops:.0f} TFLOP/s sustained, "
          f"{tok:.0f} tokens/image in rows of {SEQ_LEN}:")
    for variant, text in (("S/16", "S"), ("B/16", "B")):
      flops = train_flops_per_image(variant, text, tok, SEQ_LEN)
      need = args.device_tflops * 1e12 / flops
      print(f"   {variant}: {flops / 1e9:6.1f} GFLOP/image -> {need:7.0f} img/s -> "
            f"{need * worker_cpu:4.0f} worker cores with reduced-scale decode, "
            f"{need * worker_cpu * per_core[True] / per_core[False]:4.0f} without, plus "
            f"{need * main_cpu:.1f} of the main process (transfer, counting, packing)")


if __name__ == "__main__":
  main()
