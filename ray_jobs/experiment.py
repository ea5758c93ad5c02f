"""Run an experiment file (prepare, train, eval and export steps that name each other) on Ray.

    python ray_jobs/experiment.py experiments/sample.yaml --dry-run
    python ray_jobs/experiment.py experiments/sample.yaml
    ray job submit --working-dir . -- python ray_jobs/experiment.py experiments/sample.yaml

Each step's output is STORAGE/NAME/STEP-<hash of its config, inputs and parents>: running the file again
runs only the steps whose output is missing or incomplete. See minimind/experiment/launch.py or --help.
Connects to RAY_ADDRESS when set, else starts Ray locally.
"""

from minimind.experiment.launch import main

if __name__ == "__main__":
    main()
