"""gcp-storage-emulator with the two GCS behaviours that tensorstore's OCDBT relies on.

The stock emulator neither returns an object's generation on download (`x-goog-generation`)
nor honours `ifGenerationMatch` on upload. OCDBT (what Orbax writes checkpoints with) swaps
its manifest by compare-and-set on the generation, so without these it fails with
"Malformed StorageGeneration". Run as `python tests/gcs_emulator.py start --port=...`.
"""
from http import HTTPStatus
import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str | None:
  """The object's current generation, None if there is no such object."""
  try:
    return str(storage.get_file_obj(bucket, name).get("generation") or "")
  except NotFound:
    return None


def _download_with_generation(stock):
  def download(request, response, storage, *args, **kwargs):
    stock(request, response, storage, *args, **kwargs)
    generation = _generation(storage, request.params["bucket_name"],
                             request.params["object_id"])
    if generation is not None:
      response["x-goog-generation"] = generation
  return download


def _insert_if_generation_matches(stock):
  def insert(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if wanted:
      name = request.query.get("name", [None])[0]
      # Generation 0 means "only if the object does not exist yet".
      if wanted[0] != (_generation(storage, request.params["bucket_name"], name) or "0"):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return stock(request, response, storage, *args, **kwargs)
  return insert


objects.download = _download_with_generation(objects.download)
objects.insert = _insert_if_generation_matches(objects.insert)

if __name__ == "__main__":
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top
  sys.exit(emulator.main(sys.argv[1:]))
