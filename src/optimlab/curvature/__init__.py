r"""Sharpness: the top eigenvalue of the loss Hessian, plain or preconditioned, and its edge of stability.

Gradient descent with step size :math:`\eta` on a quadratic with Hessian :math:`H` is stable only
while :math:`\lambda_{max}(H) < 2 / \eta`. Training drives the sharpness up to that edge and then
hovers there (Cohen et al., 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge
of Stability"); crossing it shows as oscillation and divergence. An adaptive method steps
:math:`\theta \leftarrow \theta - \eta P^{-1} m` with a diagonal preconditioner :math:`P`; its
stability is set by the *preconditioned* sharpness :math:`\lambda_{max}(P^{-1/2} H P^{-1/2})`
(Cohen et al., 2022, "Adaptive Gradient Methods at the Edge of Stability").

The package computes

* :func:`sharpness` / :func:`top_eigenpair` (:mod:`~optimlab.curvature.hessian`): the largest *algebraic*
  eigenvalue of the Hessian of the mean cross-entropy of a model on a batch, or of :math:`P^{-1/2} H P^{-1/2}`,
  by Lanczos iteration (:func:`lanczos`, :mod:`~optimlab.curvature.lanczos`) on Hessian-vector products
  (double backpropagation; the Hessian is never formed). A network's Hessian is indefinite, so the
  largest-magnitude eigenvalue that plain power iteration finds may be a negative one; Lanczos' top
  Ritz value converges to the top of the spectrum from below.
* :func:`stability_threshold` (:mod:`~optimlab.curvature.stability`): the sharpness at which an optimizer's
  update becomes unstable on a quadratic, from its current hyperparameters.
* :func:`preconditioner`: the :math:`P` an adaptive optimizer's update divides by, read from its state;
  :func:`initial_preconditioner`: the :math:`P` its state settles to while the minibatch gradients
  keep their distribution at initialisation (:func:`gradient_moments`), for the sharpness at step 0.
* :class:`SharpnessTracker`, :class:`SharpnessLog` and the Lightning :class:`SharpnessCallback`
  (:mod:`~optimlab.curvature.tracking`): tracking during training, warm-started from the previous
  eigenvector, logged to the trainer's loggers and summarised per epoch.
"""

from optimlab.curvature.hessian import Eigenpair, sharpness, top_eigenpair, trainable
from optimlab.curvature.lanczos import lanczos
from optimlab.curvature.stability import (GradientMoments, gradient_moments, initial_preconditioner,
                                          moments_from_parts, preconditioner, probe_parts, stability_threshold,
                                          uses_preconditioner)
from optimlab.curvature.tracking import (DEFAULT_PROBE_SIZE, DEFAULT_TRACKING_TOL, SHARPNESS_TAG, TENSORBOARD_LAYOUT,
                                         THRESHOLD_TAG, SharpnessCallback, SharpnessLog, SharpnessTracker,
                                         check_tracking, epoch_columns, measurement_due, probe_indices,
                                         show_sharpness_chart)

__all__ = [
    "DEFAULT_PROBE_SIZE", "DEFAULT_TRACKING_TOL", "Eigenpair", "GradientMoments", "SHARPNESS_TAG", "SharpnessCallback",
    "SharpnessLog", "SharpnessTracker", "TENSORBOARD_LAYOUT", "THRESHOLD_TAG", "check_tracking", "epoch_columns",
    "gradient_moments",
    "initial_preconditioner", "lanczos", "measurement_due", "moments_from_parts", "preconditioner", "probe_indices",
    "probe_parts", "sharpness", "show_sharpness_chart", "stability_threshold", "top_eigenpair", "trainable",
    "uses_preconditioner",
]
