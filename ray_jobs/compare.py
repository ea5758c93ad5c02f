"""Compare experiments side by side: scores, compute, config differences, quality against compute.

    python ray_jobs/compare.py runs/experiments/sample runs/experiments/sample-lr2 --out runs/compare

Reads each experiment's experiment.json (local or s3://, gs://); needs no Ray. See minimind/experiment/compare.py.
"""

from minimind.experiment.compare import main

if __name__ == "__main__":
    main()
