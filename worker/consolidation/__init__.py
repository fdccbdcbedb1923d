"""Consolidation: re-fit several tasks' diffs together under one budget (Xia & Shin 2021).

Tasks T1..Tn on one base are re-fitted as one shared L0-gated diff plus one residual L0-gated
diff and one dense head per task. Training batches come from one task at a time, the task drawn
with temperature sampling over dataset sizes (p_i proportional to n_i^(1/T)). After phase 1 the
shared and all residual diffs are projected together so that their stored entries fit the
budget exactly (the shared part counted once), then the kept values are fine-tuned with the
masks fixed. Task i's model is base + shared + residual_i + head_i.

Warm start: every residual starts at its task's current diff, every head at its current head,
and the shared part at zero, so step 0 reproduces the current versions.

Scale: the shared part is dense while it trains; each residual lives on a sparse support (its
current positions plus `candidates`, picked by accumulated |gradient|) with its own values,
gates and optimizer state, so memory is O(N + T·k); a step trains only the shared part and the
drawn task's residual.

Strategies:
- ``elementwise``: one hard-concrete gate per entry; budget = kept entries.
- ``rank``: see `lowrank` (gated rank-one components, cost m + n each; embedding tables and
  1-D tensors element-wise).

Artifacts: the shared part and each residual are stored as they are counted: kept entries, and
for the rank strategy the kept components as factors U, V (artifact format version 2), never
their product. A published version stores only its residual beside the run's shared diff; the
composed diff shared + residual is built on request (`diffs.compose`) for the default
download, and serving adds both parts' corrections. `nnz` in the report always counts stored
budget entries (r·(m + n) factor values for factored matrices).

Modules: `config` (what a run takes and returns), `state` (the trainable gated diff sets),
`candidates` (where a residual may grow), `lowrank` (factor math), `budget` (projection to the
budget), `artifacts` (sparse diffs out of the fitted sets), `fit` (the training loop,
`consolidate`).
"""
