# Sourced by the embedded default and the tests: no hub, no telemetry, no update checks.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1
export TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error  # hides torchvision-less image-processor notices we never use
