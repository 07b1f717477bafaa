"""Other frameworks' checkpoints in and out of imagen-jax's models.

diffusers_format: DeepFloyd IF's U-Nets as diffusers stores them (config.json and safetensors,
read and written with numpy only: no torch), and the scheduler config of IF's pipelines.
"""
