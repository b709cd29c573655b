"""Import-time stand-in for wandb on the GPU check's machine: avalanche imports it at import
time; avalanche-d2l never logs to Weights & Biases. Put on the path only when wandb is missing."""
