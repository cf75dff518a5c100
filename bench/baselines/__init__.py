"""What users would write instead of this project, run on the same jobs and the same cores:
a thread pool around the official fal-client's `subscribe`, and a Celery task that blocks in
a poll loop. Both stand for honest user code: results end up in S3 like ours."""
