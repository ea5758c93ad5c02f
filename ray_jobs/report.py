"""Write (or rewrite) a sweep's report.md, report.html, plots and best.yaml, finished or interrupted.

python ray_jobs/report.py runs/lr-sweep
"""

from minimind.tune.launch import report_main

if __name__ == "__main__":
    report_main()
