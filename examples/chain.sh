#!/usr/bin/env bash
# Sample, score and pair by hand on the built-in tiny model; every stage resumes if rerun.
set -euo pipefail
RUN=${1:-runs/chain}
vpotool sample --model tiny --prompts examples/prompts.txt --candidates 4 --out "$RUN"
vpotool score --samples "$RUN/samples.parquet" --reward temporal --out "$RUN/scores.parquet"
vpotool pair --samples "$RUN/samples.parquet" --scores "$RUN/scores.parquet" --out "$RUN/pairs.parquet"
python -c "import pandas as pd; print(pd.read_parquet('$RUN/pairs.parquet')[['prompt', 'chosen_score', 'rejected_score', 'margin']])"
