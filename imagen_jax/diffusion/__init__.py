"""The diffusion core: pure, jit-friendly functions of arrays.

- `schedules`: continuous-time log-SNR schedules (cosine, linear betas) and alpha/sigma.
- `objectives`: forward process q(z_t | x), eps / x0 / v parameterizations, weighted losses.
- `samplers`: samplers by name (DDPM, DDIM, EDM Heun, DPM-Solver++, UniPC), evaluation counts.
- `multistep`: DPM-Solver++ and UniPC as precomputed linear multistep updates.
- `editing`: sampling with an input: start level (image-to-image), known region (inpainting),
  RePaint's resampling jumps.
- `guidance`: classifier-free guidance and the null (zeroed) text condition.
- `thresholding`: static and dynamic thresholding of x0.
- `augmentation`: noise conditioning augmentation of the low-res input of SR stages.
- `edm`: the EDM formulation (preconditioning, noise distribution, loss).
- `noise`: Gaussian noise from one key or one key per example.
- `stage_sampler`: one stage's sampling loop (network + guidance + thresholding + sampler).
"""

from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import edm
from imagen_jax.diffusion import editing
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import multistep
from imagen_jax.diffusion import noise
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import thresholding
