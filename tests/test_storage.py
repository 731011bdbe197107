"""Storage rules on a real GCS server: one path type, single-object commits, clear errors for unusable workdirs."""

import pytest

from realm_jax import storage


def test_write_once_on_gcs_is_read_back_whole(gcs_bucket):
  path = storage.as_path(f"{gcs_bucket}/run/signal.json")
  storage.write_json_once(path, {"step": 3})
  assert path.read_text().startswith("{") and storage.read_bytes(path) == path.read_bytes()
  assert [p.name for p in path.parent.iterdir()] == ["signal.json"]


def test_write_once_on_local_disk_leaves_no_partial_file(tmp_path):
  storage.write_once(tmp_path / "a" / "DONE", b"7")
  assert [p.name for p in (tmp_path / "a").iterdir()] == ["DONE"]


def test_missing_bucket_is_one_clear_error_naming_the_workdir(gcs_server):
  with pytest.raises(storage.StorageError, match=r"gs://no-such-bucket-x/run: cannot write the run directory"):
    storage.check_writable("gs://no-such-bucket-x/run")


def test_read_only_bucket_is_one_clear_error_naming_the_workdir(gcs_server, gcs_bucket):
  from gcs import FaultProxy, use_endpoint

  proxy = FaultProxy(gcs_server.url)
  try:
    proxy.fail(r"/upload/", mode="403", methods=("POST", "PUT"))
    use_endpoint(proxy.url)
    with pytest.raises(storage.StorageError, match=rf"{gcs_bucket}/run: cannot write the run directory"):
      storage.check_writable(f"{gcs_bucket}/run")
  finally:
    use_endpoint(gcs_server.url)
    proxy.stop()



def test_a_listing_shows_what_another_process_wrote_since(gcs_bucket):
  """Jobs poll each other's outputs: gcsfs must not answer from a listing cached earlier in the process."""
  import subprocess
  import sys

  from conftest import REPO, subprocess_env

  directory = storage.as_path(f"{gcs_bucket}/run/index/commits")
  storage.write_once(directory / "0.json", b"{}")
  assert [p.name for p in directory.iterdir()] == ["0.json"]
  writer = f"from etils import epath; epath.Path('{directory}/2.json').write_bytes(b'{{}}')"
  subprocess.run([sys.executable, "-c", writer], cwd=REPO, env=subprocess_env(), check=True, timeout=60)
  assert sorted(p.name for p in directory.iterdir()) == ["0.json", "2.json"]
  assert (directory / "2.json").exists()


def test_a_read_whose_server_goes_silent_times_out_and_is_retried(gcs_server, gcs_bucket):
  import time

  from gcs import FaultProxy, use_endpoint

  path = storage.as_path(f"{gcs_bucket}/run/commits/3.json")
  storage.write_once(path, b'{"step": 3}')
  proxy = FaultProxy(gcs_server.url)
  proxy.fail(r"/commits/3\.json", mode="stall:60", times=1)
  try:
    storage.configure_gcs(read_timeout_seconds=2)
    use_endpoint(proxy.url)
    start = time.monotonic()
    assert storage.read_bytes(path) == b'{"step": 3}'
    assert time.monotonic() - start < 30  # not the 60 s the server stayed silent
  finally:
    storage.configure_gcs()
    use_endpoint(gcs_server.url)
    proxy.stop()
