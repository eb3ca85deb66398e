"""The web UI's HTTP API over a pipeline: its request and answer shapes, the job queue, img2img input
preparation, the HTTP edge."""
