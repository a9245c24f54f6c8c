"""3x3 convolutions whose gradients are computed by functions we choose.

The gradient of y = conv3x3(x, kernel) (stride 1, SAME padding) in x is the
same kind of convolution, of the cotangent with the kernel mirrored and its
input and output channels swapped; in the kernel it is a correlation of x
with the cotangent. On XLA:CPU the algorithm that computes a convolution
fastest is often not what autodiff makes of it, so `with_gradients` pairs a
forward function with a kernel-gradient function and routes the input's
gradient back through the same forward (second derivatives, such as the
discriminator's R1 penalty, then take the same paths).
"""

from typing import Callable

import jax
import jax.numpy as jnp

Conv = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def mirrored(kernel: jnp.ndarray) -> jnp.ndarray:
  """HWIO [3, 3, I, O] -> [3, 3, O, I], flipped in space: the kernel whose
  convolution of the cotangent is the input's gradient."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def with_gradients(conv: Conv, kernel_gradient: Conv) -> Conv:
  """conv(x, kernel) with input gradient conv(cotangent, mirrored(kernel))
  and kernel gradient kernel_gradient(x, cotangent)."""
  @jax.custom_vjp
  def convolution(x, kernel):
    return conv(x, kernel)

  def forward(x, kernel):
    return conv(x, kernel), (x, kernel)

  def backward(residuals, cotangent):
    x, kernel = residuals
    return (convolution(cotangent, mirrored(kernel)),
            kernel_gradient(x, cotangent))

  convolution.defvjp(forward, backward)
  return convolution
