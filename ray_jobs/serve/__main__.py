from ray_jobs.cli import run_stage

run_stage("serve")
