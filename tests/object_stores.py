"""Object-store servers on localhost for the tests (fixtures in conftest.py): moto's S3
server and gcp-storage-emulator's GCS server, each with bucket "bkt", and the environment
that points every client at them (boto3 / s3fs, gcsfs, TensorStore's GCS driver)."""

from __future__ import annotations

import contextlib
import socket

import pytest


@contextlib.contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch):
  """A moto S3 server on a free localhost port; yields "s3://bkt"."""
  moto_server = pytest.importorskip("moto.server")
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
    monkeypatch.setenv(k, v)
  import boto3

  boto3.client("s3").create_bucket(Bucket="bkt")
  try:
    yield "s3://bkt"
  finally:
    server.stop()


def _with_generation_headers(download):
  """gcp-storage-emulator's media download handler, answering with the object's
  x-goog-generation and x-goog-metageneration headers as GCS does: TensorStore's GCS driver
  reads an object's generation from them (without, it fails on its second read of an OCDBT
  manifest: "Malformed StorageGeneration")."""
  from gcp_storage_emulator.exceptions import NotFound

  def with_headers(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
    except NotFound:
      pass  # the handler answers 404 itself
    return download(request, response, storage, *args, **kwargs)

  return with_headers


@contextlib.contextmanager
def gcs_server(monkeypatch: pytest.MonkeyPatch):
  """gcp-storage-emulator on a free localhost port; yields "gs://bkt".

  gcsfs's experimental bucket-layout lookup (gRPC, which the emulator does not serve) is
  turned off: it would wait a minute per bucket before falling back to JSON calls."""
  emulator = pytest.importorskip("gcp_storage_emulator.server")
  from gcp_storage_emulator.handlers import objects
  gcsfs_core = pytest.importorskip("gcsfs.core")
  import fsspec

  monkeypatch.setattr(objects, "download", _with_generation_headers(objects.download))
  monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  previous = fsspec.get_filesystem_class("gs")
  fsspec.register_implementation("gs", gcsfs_core.GCSFileSystem, clobber=True)
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
  server.start()
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
    monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
  try:
    yield "gs://bkt"
  finally:
    server.stop()
    fsspec.register_implementation("gs", previous, clobber=True)
