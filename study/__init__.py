"""Parts of the RMT study runner (`study_rmt.py`): baselines, runs, visibility masks, statistics, tables and plots."""
