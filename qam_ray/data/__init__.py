"""Data: OGBench loading and validation, offline generation, and the device-resident chunk buffer."""

import warnings

# OGBench's manipulation envs build their action Box from float64 bounds on every access; gymnasium then warns
# that it casts them to float32, harmlessly, each time an env is made (generation workers, EnvRunners, probes).
warnings.filterwarnings("ignore", message=r".*Box (low|high)'s precision lowered by casting to float32",
                        category=UserWarning)
