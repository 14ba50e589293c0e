"""The column names the report's tables share, declared once: `specdec.report.aggregate` writes them
(runs, requests, itl, positions, power), `specdec.report.summary`, `specdec.report.sweeps` and
`specdec.report.theory` derive the summary's and their own, and `specdec.report.tables` and
`specdec.report.figures` read them. A DIST metric's statistics are `{metric}_{field}` (`ttft_s_p50`),
an estimate's interval `{metric}_ci_low` and `{metric}_ci_high`."""

# A run and the cell it repeats.
EXPERIMENT = "experiment"
CELL = "cell"  # one run: the cell's name with its repeat (the folder)
CELL_NAME = "cell_name"  # the cell without its repeat: a summary row
CELL_ID = "cell_id"
GROUP_ID = "group_id"
AR_GROUP_ID = "ar_group_id"  # the AR the cell's ratios divide by
SPECDEC_AR_GROUP_ID = "specdec_ar_group_id"  # our engine's AR, for speedup_vs_specdec_ar
REPEAT = "repeat"
STATUS = "status"

# The cell's settings.
REFERENCE = "reference"
DATASET = "dataset"
TARGET = "target"
ENGINE = "engine"
METHOD = "method"
METHOD_LABEL = "method_label"
DRAFTER = "drafter"
MEASUREMENT_TOOL = "measurement_tool"
GAMMA = "gamma"
BATCH_SIZE = "batch_size"
MAX_NEW_TOKENS = "max_new_tokens"
TEMPERATURE = "temperature"
SEED = "seed"
PLACEMENT_STRATEGY = "placement_strategy"
LOAD = "load"
LOAD_MODE = "load_mode"
LOAD_ARRIVAL = "load_arrival"
LOAD_RATE = "load_rate"

# Measured, per run or per request.
REQUEST_ID = "request_id"
CATEGORY = "category"
OUTPUT_TOKENS = "output_tokens"
THROUGHPUT_TOK_S = "throughput_tok_s"
TTFT_S = "ttft_s"
TPOT_S = "tpot_s"
ITL_S = "itl_s"
E2E_S = "e2e_s"
DRAFTED_TOKENS = "drafted_tokens"
ACCEPTED_TOKENS = "accepted_tokens"
TARGET_FORWARDS = "target_forwards"
ACCEPTANCE_RATE = "acceptance_rate"
MEAN_ACCEPTED_LENGTH = "mean_accepted_length"
MEAN_ACCEPTANCE_LENGTH = "mean_acceptance_length"
ACCEPTED_PER_STEP = "accepted_per_step"
POSITION = "position"
DRAFTED = "drafted"
ACCEPTED = "accepted"
ENERGY_J_PER_TOKEN = "energy_j_per_token"
ENERGY_J_PER_ACCEPTED_TOKEN = "energy_j_per_accepted_token"
ENERGY_REASON = "energy_reason"
COTENANT_FLAG = "cotenant_flag"
NEAR_TIES = "near_ties"
DEFECTS = "defects"

# The summary's estimates and what they rest on.
SPEEDUP = "speedup"
SPEEDUP_VS_SPECDEC_AR = "speedup_vs_specdec_ar"
LATENCY_SPEEDUP = "latency_speedup"
PREDICTED_SPEEDUP = "predicted_speedup"
PREDICTED_TAU = "predicted_tau"  # tokens a drafting step yields, predicted (beside mean_acceptance_length, measured)
VERIFY_COST_RATIO = "theory_verify_cost_ratio"  # the verification forward over AR's one-token forward (v)
NODES_PER_DRAFT = "nodes_per_draft"  # draft nodes a drafting step verified (a chain's tokens)
THEORY_COST_RATIO = "theory_cost_ratio"  # the drafter's one-token forward over the target's (c)
GOODPUT_REQ_S = "goodput_req_s"
SLO_MET = "slo_met"
N_REPEATS = "n_repeats"
N_REQUESTS = "n_requests"
SPEEDUP_REQUESTS = "speedup_requests"
BASELINE = "baseline"
FLAGS = "flags"

# Series along an axis (`specdec.report.sweeps`).
SERIES = "series"
AXIS = "axis"
BREAK_EVEN = "break_even"
