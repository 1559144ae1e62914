"""DELETE /api/v1/jobs/{id}/artifacts: free a finished job's files."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from server import api_schemas as schemas
from server import deletion
from server.auth import authenticate_api_request
from server.openapi import operation
from server.params import NoQuery, check_path_ids, parse_query
from server.serialize import iso

bp = Blueprint("artifacts_v1", __name__, url_prefix="/api/v1/jobs")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)


@bp.delete("/<int:job_id>/artifacts")
@operation(
    tag="artifacts",
    ok={200: schemas.ArtifactsDeleted},
    errors={
        404: "",
        409: "The job has not finished, a queued or running evaluate job uses its checkpoint, "
        "or a registered model version pins its files.",
        413: "",
    },
)
def delete_artifacts(job_id: int) -> ResponseReturnValue:
    """Delete a finished job's files: checkpoints, exports and its log.

    The job, its metrics and its timeline stay; the job then shows
    `artifacts_deleted_at`, its file listing is empty and a download answers 410.
    Deleting again is harmless. Admins may delete any job's files.
    """
    parse_query(NoQuery)
    job, freed = deletion.delete_job_artifacts(job_id)
    return jsonify(
        {
            "job_id": job.id,
            "artifacts_deleted_at": iso(job.artifacts_deleted_at),
            "freed_bytes": freed,
        }
    )
