"""The beam lifetime: what the stored current decays with, and what a current monitor measures of it.

``BeamLifetime`` says where the lifetime comes from: physics (the equilibrium's Touschek lifetime,
scaled to the bunch current of the moment, and gas scattering), or an override. ``CurrentMonitor`` is
the DCCT: a noisy reading of the current, and lifetimes fitted to the decay of its readings over
fixed windows, as a control room's current monitor computes them. Plain numpy, no pyAT.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

SECONDS_PER_HOUR = 3600.0


@dataclass
class BeamLifetime:
    """Where the stored beam's lifetime comes from: *override_h* (NaN: physics; inf: no decay), else
    1/τ = 1/τ_Touschek + 1/τ_gas with the Touschek part scaled to the current bunch current."""

    override_h: float
    gas_h: float

    def touschek_h(self, equilibrium, current_mA: float) -> float:
        """The Touschek lifetime (h) at *current_mA*; NaN without an equilibrium."""
        if equilibrium is None or equilibrium.reason or not math.isfinite(equilibrium.touschek_lifetime):
            return math.nan
        return equilibrium.touschek_at(current_mA) / SECONDS_PER_HOUR

    def now(self, equilibrium, current_mA: float) -> tuple[float, str]:
        """The lifetime (h) the current decays with now, and where it comes from."""
        if not math.isnan(self.override_h):
            return self.override_h, f"override: {self.override_h:g} h ($(P)BEAM:LIFETIME or [beam] lifetime_h)"
        touschek = self.touschek_h(equilibrium, current_mA)
        if math.isnan(touschek):
            return self.gas_h, f"gas scattering {self.gas_h:g} h alone (no equilibrium)"
        total = 1.0 / (1.0 / touschek + 1.0 / self.gas_h)
        return total, f"physics: Touschek {touschek:.3g} h, gas {self.gas_h:g} h"


class CurrentMonitor:
    """A DCCT: readings of the current with noise (σ *noise_mA*), and the lifetime fitted to the
    logarithm of the readings over each window (s). An injection (a rise well beyond the noise) or
    a lost beam starts the windows again, as the decay before it says nothing of the beam after."""

    def __init__(self, windows_s: tuple[float, ...], noise_mA: float, rng: np.random.Generator):
        self.windows = windows_s
        self.noise = noise_mA
        self._rng = rng
        self._samples: deque[tuple[float, float]] = deque()
        self.reading = 0.0
        self._fitted: dict[float, float] = {w: math.nan for w in windows_s}
        self._fitted_at = -math.inf

    def read(self, now: float, current_mA: float) -> float:
        """The monitor's reading of *current_mA* at time *now* (s); it joins the windows."""
        noise = self.noise * float(self._rng.standard_normal()) if self.noise else 0.0
        reading = current_mA + noise if current_mA > 0 else 0.0
        rise = reading - self.reading
        if reading <= 0 or rise > 5 * self.noise + 1e-9:
            self._samples.clear()
        self.reading = reading
        if reading > 0:
            self._samples.append((now, reading))
        while self._samples and now - self._samples[0][0] > max(self.windows):
            self._samples.popleft()
        return reading

    def lifetimes_h(self, now: float, every_s: float = 0.5) -> dict[float, float]:
        """The lifetime of each window (h), fitted again when *every_s* has passed."""
        if now - self._fitted_at >= every_s:
            self._fitted = {w: self.lifetime_h(w) for w in self.windows}
            self._fitted_at = now
        return self._fitted

    def lifetime_h(self, window_s: float) -> float:
        """-1/slope of ln(I) over the last *window_s* seconds, in h: noisy as the readings are, and
        negative when the noise outweighs the decay (as the real monitors read at low current).
        inf while the current does not decay at all; NaN with fewer than two readings."""
        if not self._samples:
            return math.nan
        last = self._samples[-1][0]
        window = [(t, i) for t, i in self._samples if last - t <= window_s]
        if len(window) < 2:
            return math.nan
        times, currents = np.array(window).T
        if np.ptp(currents) == 0:
            return math.inf  # not decaying at all (no noise either)
        slope = np.polyfit(times - last, np.log(currents), 1)[0]
        return -1.0 / slope / SECONDS_PER_HOUR if slope != 0 else math.inf
