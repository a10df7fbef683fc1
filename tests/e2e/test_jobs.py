"""The cluster path: a real `ray start --head` on loopback, the study submitted through the
Ray Jobs API with the project as working dir, exactly as `ray job submit` does."""

import subprocess
import sys
import time

import pytest
from conftest import RAY, ROOT, free_port, metrics_table

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    gcs, dashboard = free_port(), free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_submit_study_through_jobs_api(ray_head, tmp_path, tiny_run):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    results = tmp_path / "results"
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m farm run tests/fixtures/tiny.yaml --results {results}",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv/", ".git/", "results/", "*.egg-info/"]},
    )
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert "farm: report at" in logs and (results / "tiny" / "report.md").exists()
    # Fresh storage, a different Ray: same trial ids, same metrics on CPU as the local run.
    assert metrics_table(results).equals(metrics_table(tiny_run[0]))
