"""Pathfinder: a seeded, deterministic generator of the contour-integration task.

Pathfinder is the task of Linsley, Kim, Veerabadran, Windolf & Serre, "Learning
long-range spatial dependencies with horizontal gated-recurrent units" (NeurIPS
2018); Long Range Arena (Tay et al., "Long Range Arena: A Benchmark for
Efficient Transformers", ICLR 2021) uses a 32 x 32 version, Pathfinder32.  An
image holds two dashed target snakes, A and B, of ``length`` paddles each, some
shorter distractor snakes, and two circle markers; the label says whether both
markers lie on one snake (1) or on two different snakes (0).  This module
implements the published algorithm from its description (no code was copied):

Paddles
    A paddle is a straight bar: the pixels whose centres lie in the rectangle of
    length ``paddle_length`` along a direction and width ``paddle_thickness``
    across it (flat ends).  A snake starts at its seed with a uniformly random
    direction; every next paddle starts ``margin`` px after the previous
    paddle's end, along the new direction, which leaves the gap that makes the
    snake dashed.

Directions
    The next direction is the current one plus an offset drawn from
    ``n_directions`` candidates spread evenly (with one random shift per paddle,
    so that every angle can occur) over ``|dtheta| < pi / (2 continuity)``
    (at most a half turn), weighted by ``cos^2(min(continuity |dtheta|, pi/2))``:
    a large ``continuity`` gives smooth snakes.  A candidate is dropped when its
    paddle would leave the drawing area or come near another snake; the next
    one is drawn from the remaining candidates by their weights.  When no
    candidate fits, the whole snake is erased and restarted from a new seed.

Occupancy
    An occupancy map holds, per raster pixel, which snake owns it and which
    paddle.  A new paddle is refused when any pixel of another snake (or of its
    own snake, except the previous paddle) lies within ``margin`` of the
    paddle's rectangle, or a pixel of the previous paddle lies within
    ``sqrt(2)`` px of it (so consecutive paddles never touch, even in a sharp
    turn).  Pixels of different snakes are therefore more than ``margin`` apart:
    snakes never touch, and with ``margin`` >= 1.5 raster px not even as
    8-neighbours.  That holds on the drawing raster (the label map of
    ``return_info``); after Pathfinder32's 4 x 4 averaging, snakes 1 px apart
    can fill neighbouring output pixels, as in LRA's images.

Markers
    Markers are filled discs of radius ``marker_radius`` around snake ends.  The
    first is always at the start of A; the second at the end of A (label 1) or at
    the end of B (label 0), a fair coin per image.  All four target ends reserve
    their disc in the occupancy map as soon as their snake is placed (so a
    marker never touches another snake, and an unmarked end looks like a marked
    one's surroundings); B is restarted when one of its end discs would come
    within ``margin`` of A.

Seeds and padding
    Seeds are uniform in the drawing area: the window minus a border of
    ``padding`` px on each side.  Every paddle pixel (centre) and every paddle
    end lies inside that area; markers may reach into the border (and are
    clipped at the window edge).  The seed of B is at least ``seed_distance`` px
    (Euclidean, between the two start points, in window px) from the seed of A.

Distractors
    Distractor snakes have ``max(1, length // 3)`` paddles.  Their number is
    ``round(distractor_budget / length)`` (``distractor_rule="paper"``; 90/length
    in the 300 x 300 paper window) or ``distractor_budget // (length // 3)``
    (``"lra"``; LRA documents 20 // distractor length for Pathfinder32).  The
    count is a density in paddle units: :meth:`PathfinderParams.scaled` shrinks
    every length by one factor, so the window's area measured in squared paddle
    steps, and with it the count, stays the same.  A distractor that cannot be
    placed in a few tries is dropped (the info records how many were placed).

Retries
    A target snake gets ``TARGET_TRIES`` seeds; if A or B cannot be placed the
    whole image is restarted, at most ``IMAGE_TRIES`` times, then
    :class:`~implreg.config.ConfigError` says the length does not fit.

Rendering
    Snakes and markers are drawn at full intensity on a raster of
    ``window * antialias`` px (geometry multiplied by ``antialias``), then
    reduced to ``out_size`` x ``out_size`` by averaging blocks (area averaging):
    the paper draws 300 x 300 and keeps 150 x 150 (2 x 2 blocks); Pathfinder32
    draws its 0.5 px thin bars on a 4x raster (128 x 128) and averages 4 x 4
    blocks, which anti-aliases them into grey lines on a 32 x 32 image.

Determinism
    Image ``k`` uses ``np.random.default_rng([seed, length, stream, k])`` only,
    so ``generate(10, ...)`` gives the first 10 images of ``generate(100, ...)``
    with the same arguments.  The placement loop is compiled with numba
    (``cache=True``); random numbers are drawn by numpy beforehand.  The label
    is the generator's first draw and the snakes use none of it: the label
    changes where the second marker goes, never the snakes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numba import njit

from implreg.config import ConfigError

TARGET_TRIES = 40  # seeds per target snake and image attempt
DISTRACTOR_TRIES = 8  # seeds per distractor before it is dropped
IMAGE_TRIES = 25  # whole-image restarts before giving up
_FIRST_DRAWS = 4096  # uniforms handed to the compiled loop; grows x4 when used up
GENERATOR_VERSION = 1  # part of the cache key: bump when the images change

_OK, _NEED_MORE, _FAILED = 0, 1, 2


@dataclass(frozen=True)
class PathfinderParams:
    """Geometry of Pathfinder images; lengths are in window px (before resizing).

    ``PathfinderParams.paper()`` is Linsley et al. (2018); ``PathfinderParams.lra32()``
    is Long Range Arena's Pathfinder32 (Tay et al. 2021); ``scaled(out_size)``
    shrinks the paper geometry to another output size (e.g. 64).
    """

    window: int = 300  # side of the drawing window, px
    out_size: int = 150  # side of the returned image, px (window * antialias / out_size integer)
    antialias: int = 1  # raster supersampling factor: drawing happens at window * antialias px
    padding: float = 22.0  # border (px) that no paddle enters and no seed is drawn in
    paddle_length: float = 5.0
    paddle_thickness: float = 2.0
    margin: float = 3.0  # gap between consecutive paddles; least distance between snakes
    continuity: float = 1.8  # c in the weight cos^2(min(c |dtheta|, pi/2))
    seed_distance: float = 27.0  # least distance between the start points of A and B
    marker_radius: float = 3.0
    distractor_budget: float = 90.0  # see distractor_count
    distractor_rule: Literal["paper", "lra"] = "paper"
    n_directions: int = 12  # candidate directions per paddle

    def __post_init__(self) -> None:
        for name in ("window", "out_size", "antialias", "n_directions"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
                raise ConfigError(f"{name} must be a positive integer, got {val!r}")
        for name in (
            "padding",
            "paddle_length",
            "paddle_thickness",
            "margin",
            "continuity",
            "seed_distance",
            "marker_radius",
            "distractor_budget",
        ):
            val = getattr(self, name)
            positive = name not in ("padding", "seed_distance", "distractor_budget")
            if (
                isinstance(val, bool)
                or not isinstance(val, numbers.Real)
                or not math.isfinite(val)
                or val < 0
                or (positive and val == 0)
            ):
                what = "a positive number" if positive else "a non-negative number"
                raise ConfigError(f"{name} must be {what}, got {val!r}")
        if self.distractor_rule not in ("paper", "lra"):
            raise ConfigError(
                f"distractor_rule must be 'paper' or 'lra', got {self.distractor_rule!r}"
            )
        if (self.window * self.antialias) % self.out_size:
            raise ConfigError(
                f"out_size must divide window * antialias = {self.window * self.antialias}, "
                f"got {self.out_size}"
            )
        if 2 * self.padding >= self.window:
            raise ConfigError(f"padding must be below window / 2 = {self.window / 2}")
        if self.margin * self.antialias < 1.5:
            raise ConfigError(
                f"margin must be at least 1.5 raster px (margin * antialias), got "
                f"{self.margin * self.antialias:g}; raise antialias"
            )
        if self.paddle_thickness * self.antialias < 1:
            raise ConfigError(
                f"paddle_thickness must be at least 1 raster px (paddle_thickness * antialias), "
                f"got {self.paddle_thickness * self.antialias:g}; raise antialias"
            )

    @classmethod
    def paper(cls) -> PathfinderParams:
        """Linsley et al. (2018): 300 x 300 window (padding 22) resized to 150 x 150."""
        return cls()

    @classmethod
    def lra32(cls) -> PathfinderParams:
        """Long Range Arena's Pathfinder32 (Tay et al. 2021), as its generator documents.

        Window 32 x 32 (padding 1), paddle 2, thickness 0.5, margin 1, seed distance
        7, marker radius 1.5, continuity 1.0, 20 // (length // 3) distractors.  The
        thin bars are drawn on a 128 x 128 raster and block-averaged (anti-aliasing).
        """
        return cls(
            window=32,
            out_size=32,
            antialias=4,
            padding=1.0,
            paddle_length=2.0,
            paddle_thickness=0.5,
            margin=1.0,
            continuity=1.0,
            seed_distance=7.0,
            marker_radius=1.5,
            distractor_budget=20.0,
            distractor_rule="lra",
        )

    @classmethod
    def scaled(cls, out_size: int) -> PathfinderParams:
        """The paper geometry shrunk (or grown) to ``out_size`` x ``out_size`` images.

        The window stays twice the output (``2 * out_size``) and every length
        (paddle, thickness, margin, padding, seed distance, marker) is multiplied
        by ``out_size / 150``; ``antialias`` is the least factor that draws the
        margin at >= 1.5 and the thickness at >= 2 raster px.  The picture is the
        paper's, only at another resolution, and the distractor count is the
        paper's: it is a density per squared paddle step, which scaling keeps.
        ``scaled(150)`` is ``paper()``.
        """
        size = _as_int("out_size", out_size, 1)
        f = size / 150.0
        thickness, margin = 2.0 * f, 3.0 * f
        antialias = 1
        while thickness * antialias < 2.0 - 1e-9 or margin * antialias < 1.5:
            antialias += 1
        return cls(
            window=2 * size,
            out_size=size,
            antialias=antialias,
            padding=22.0 * f,
            paddle_length=5.0 * f,
            paddle_thickness=thickness,
            margin=margin,
            continuity=1.8,
            seed_distance=27.0 * f,
            marker_radius=3.0 * f,
        )

    def distractor_count(self, length: int) -> int:
        """Number of distractor snakes for targets of ``length`` paddles (see module doc)."""
        if self.distractor_rule == "lra":
            return int(self.distractor_budget // distractor_length(length))
        return int(math.floor(self.distractor_budget / length + 0.5))

    @property
    def raster(self) -> int:
        """Side of the drawing raster, px."""
        return self.window * self.antialias


PARAMS: dict[str, PathfinderParams] = {
    "paper": PathfinderParams.paper(),
    "lra32": PathfinderParams.lra32(),
}


def distractor_length(length: int) -> int:
    """Paddles of a distractor snake: ``max(1, length // 3)``."""
    return max(1, length // 3)


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def resolve_params(params: PathfinderParams | str) -> PathfinderParams:
    """A :class:`PathfinderParams`, or one of ``PARAMS`` by name."""
    if isinstance(params, PathfinderParams):
        return params
    if isinstance(params, str) and params in PARAMS:
        return PARAMS[params]
    raise ConfigError(
        f"params must be one of {sorted(PARAMS)} or a PathfinderParams, got {params!r}"
    )


def _check_fits(length: int, p: PathfinderParams) -> None:
    """Refuse lengths whose two target snakes (with their margins) cannot fit the window.

    The rule: the two targets' footprints, each ``length`` steps of
    ``paddle_length + margin`` by ``paddle_thickness + 2 margin``, may cover at
    most half of the drawing area.  Lengths that pass but still fail to be placed
    raise after ``IMAGE_TRIES`` restarts.
    """
    inner = (p.window - 2 * p.padding) ** 2
    need = 2 * length * (p.paddle_length + p.margin) * (p.paddle_thickness + 2 * p.margin)
    if need > inner / 2:
        raise ConfigError(
            f"length {length} is too long for a {p.window} px window with padding "
            f"{p.padding:g}: two snakes need about {need:.0f} px^2 of {inner:.0f}"
        )


# --------------------------------------------------------------------------- compiled core


@njit(cache=True)
def _uniform(u, cur):
    """The next uniform of ``u``; wraps around and flags ``cur[1]`` when they are used up."""
    i = cur[0]
    if i >= u.size:
        cur[1] = 1
        i = i % u.size
    cur[0] += 1
    return u[i]


@njit(cache=True)
def _paddle(owner, pidx, sid, k, sx, sy, theta, geo, write):
    """Test (and with ``write`` draw) paddle ``k`` of snake ``sid`` from (sx, sy) along theta.

    ``geo`` = (length, half thickness, margin, gap to the previous paddle, lo, hi)
    in raster px, the drawing area being ``[lo, hi]^2`` in pixel-centre
    coordinates.  Returns the number of paddle pixels, or -1 when the paddle
    leaves the area, has no pixel, or comes near an occupied pixel.
    """
    length, half, margin, gap, lo, hi = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    n = owner.shape[0]
    dx, dy = math.cos(theta), math.sin(theta)
    ex, ey = sx + length * dx, sy + length * dy
    if ex < lo or ex > hi or ey < lo or ey > hi or sx < lo or sx > hi or sy < lo or sy > hi:
        return -1
    ext = half + margin + 1.0
    x0 = max(0, int(math.floor(min(sx, ex) - ext)))
    x1 = min(n - 1, int(math.ceil(max(sx, ex) + ext)))
    y0 = max(0, int(math.floor(min(sy, ey) - ext)))
    y1 = min(n - 1, int(math.ceil(max(sy, ey) + ext)))
    m2, g2 = margin * margin, gap * gap
    npix = 0
    for i in range(y0, y1 + 1):
        py = i - sy
        for j in range(x0, x1 + 1):
            px = j - sx
            t = px * dx + py * dy
            w = abs(py * dx - px * dy)
            dt = max(0.0, max(-t, t - length))
            dw = max(0.0, w - half)
            d2 = dt * dt + dw * dw
            o = owner[i, j]
            if d2 == 0.0:
                if write:
                    owner[i, j] = sid
                    pidx[i, j] = k
                    npix += 1
                    continue
                if o != 0 or j < lo or j > hi or i < lo or i > hi:
                    return -1
                npix += 1
            elif o != 0 and not write:
                lim = g2 if (o == sid and pidx[i, j] == k - 1) else m2
                if d2 <= lim:
                    return -1
    if npix == 0:
        return -1
    return npix


@njit(cache=True)
def _erase(owner, pidx, sid, box):
    for i in range(box[0], box[1] + 1):
        for j in range(box[2], box[3] + 1):
            if owner[i, j] == sid:
                owner[i, j] = 0
                pidx[i, j] = 0


@njit(cache=True)
def _grow(owner, pidx, sid, npad, sx, sy, theta, geo, cont, ndir, u, cur, ends, counts):
    """Grow snake ``sid`` of ``npad`` paddles from (sx, sy); erase it and return False on failure.

    ``ends[sid]`` receives (start y, start x, end y, end x); ``counts[sid]`` the
    number of paddles drawn.
    """
    n = owner.shape[0]
    length, margin = geo[0], geo[2]
    ext = geo[1] + 2.0
    box = np.array([n, -1, n, -1])
    span = min(math.pi / (2.0 * cont), math.pi)
    delta = np.empty(ndir)
    weight = np.empty(ndir)
    x, y, th = sx, sy, theta
    for k in range(npad):
        if k == 0:  # the first paddle starts at the seed, along theta: one candidate
            ncand, step = 1, 0.0
            delta[0], weight[0], total = 0.0, 1.0, 1.0
        else:
            ncand, step = ndir, margin
            shift = _uniform(u, cur)
            total = 0.0
            for q in range(ndir):
                delta[q] = -span + (q + shift) * (2.0 * span / ndir)
                c = math.cos(min(cont * abs(delta[q]), 0.5 * math.pi))
                weight[q] = c * c
                total += weight[q]
        ok = False
        for _ in range(ncand):
            if total <= 1e-12:
                break
            r = _uniform(u, cur) * total
            q = -1
            acc = 0.0
            for cand in range(ncand):
                if weight[cand] > 0.0:
                    q = cand  # the last candidate left if rounding leaves acc < r
                    acc += weight[cand]
                    if acc >= r:
                        break
            if q < 0:
                break
            nth = th + delta[q]
            nx, ny = x + step * math.cos(nth), y + step * math.sin(nth)
            if _paddle(owner, pidx, sid, k, nx, ny, nth, geo, False) > 0:
                ok = True
                x, y, th = nx, ny, nth
                break
            total -= weight[q]
            weight[q] = 0.0
        if not ok:
            if box[1] >= 0:
                _erase(owner, pidx, sid, box)
            return False
        if k == 0:
            ends[sid, 0], ends[sid, 1] = y, x
        _paddle(owner, pidx, sid, k, x, y, th, geo, True)
        ex, ey = x + length * math.cos(th), y + length * math.sin(th)
        box[0] = max(0, min(box[0], int(math.floor(min(y, ey) - ext))))
        box[1] = min(n - 1, max(box[1], int(math.ceil(max(y, ey) + ext))))
        box[2] = max(0, min(box[2], int(math.floor(min(x, ex) - ext))))
        box[3] = min(n - 1, max(box[3], int(math.ceil(max(x, ex) + ext))))
        x, y = ex, ey
    ends[sid, 2], ends[sid, 3] = y, x
    counts[sid] = npad
    return True


@njit(cache=True)
def _disc_clear(owner, sid, cy, cx, radius):
    """True when no pixel of another snake lies within ``radius`` of (cy, cx)."""
    n = owner.shape[0]
    r2 = radius * radius
    for i in range(
        max(0, int(math.floor(cy - radius))), min(n - 1, int(math.ceil(cy + radius))) + 1
    ):
        for j in range(
            max(0, int(math.floor(cx - radius))), min(n - 1, int(math.ceil(cx + radius))) + 1
        ):
            o = owner[i, j]
            if o != 0 and o != sid and (i - cy) ** 2 + (j - cx) ** 2 <= r2:
                return False
    return True


@njit(cache=True)
def _reserve(owner, pidx, sid, cy, cx, radius):
    """Mark the free pixels of a marker disc as owned by ``sid`` (paddle index -1)."""
    n = owner.shape[0]
    r2 = radius * radius
    for i in range(
        max(0, int(math.floor(cy - radius))), min(n - 1, int(math.ceil(cy + radius))) + 1
    ):
        for j in range(
            max(0, int(math.floor(cx - radius))), min(n - 1, int(math.ceil(cx + radius))) + 1
        ):
            if owner[i, j] == 0 and (i - cy) ** 2 + (j - cx) ** 2 <= r2:
                owner[i, j] = sid
                pidx[i, j] = -1


@njit(cache=True)
def _place(owner, pidx, geo, extra, npad, ndis, dpad, u, ends, counts, tries):
    """Place targets A (id 1), B (id 2) and up to ``ndis`` distractors (ids 3..).

    ``extra`` = (continuity, marker radius, seed distance) in raster px (continuity
    unitless); ``tries`` = (n_directions, target, distractor, image tries).
    Returns (status, image attempts used, distractors placed).  (One call site
    per helper, with variables rather than constants: numba compiles a helper
    once per distinct literal argument, which would multiply the compile time.)
    """
    cont, radius, seed_dist = extra[0], extra[1], extra[2]
    ndir, t_tries, d_tries, i_tries = tries[0], tries[1], tries[2], tries[3]
    lo, hi = geo[4], geo[5]
    margin = geo[2]
    n = owner.shape[0]
    whole = np.array([0, n - 1, 0, n - 1])
    cur = np.zeros(2, np.int64)
    for attempt in range(i_tries):
        owner[:, :] = 0
        pidx[:, :] = 0
        counts[:] = 0
        sid = 1
        failed = False
        for slot in range(2 + ndis):  # 0: A, 1: B, then distractors
            target = slot < 2
            length = npad if target else dpad
            ok = False
            for _ in range(t_tries if target else d_tries):
                sx = lo + (hi - lo) * _uniform(u, cur)
                sy = lo + (hi - lo) * _uniform(u, cur)
                if slot == 1:  # B: redraw the seed until it is far enough from A's
                    for _s in range(50):
                        if (sx - ends[1, 1]) ** 2 + (sy - ends[1, 0]) ** 2 >= seed_dist**2:
                            break
                        sx = lo + (hi - lo) * _uniform(u, cur)
                        sy = lo + (hi - lo) * _uniform(u, cur)
                    if (sx - ends[1, 1]) ** 2 + (sy - ends[1, 0]) ** 2 < seed_dist**2:
                        continue
                th = 2.0 * math.pi * _uniform(u, cur)
                if not _grow(
                    owner, pidx, sid, length, sx, sy, th, geo, cont, ndir, u, cur, ends, counts
                ):
                    continue
                if target and not (
                    _disc_clear(owner, sid, ends[sid, 0], ends[sid, 1], radius + margin)
                    and _disc_clear(owner, sid, ends[sid, 2], ends[sid, 3], radius + margin)
                ):
                    _erase(owner, pidx, sid, whole)
                    counts[sid] = 0
                    continue
                ok = True
                break
            if cur[1]:
                return _NEED_MORE, attempt, 0
            if not ok:
                if target:
                    failed = True
                    break
                continue  # a distractor that does not fit is dropped
            if target:
                for e in range(2):
                    _reserve(owner, pidx, sid, ends[sid, 2 * e], ends[sid, 2 * e + 1], radius)
            sid += 1
        if not failed:
            return _OK, attempt + 1, sid - 3
    return _FAILED, i_tries, 0


@njit(cache=True)
def _render(owner, pidx, markers, radius, block, image):
    """Paddle pixels and marker discs at 255, averaged over ``block`` x ``block`` blocks."""
    n = owner.shape[0]
    out = image.shape[0]
    r2 = radius * radius
    on = np.zeros((n, n), np.uint8)
    for i in range(n):
        for j in range(n):
            if owner[i, j] != 0 and pidx[i, j] >= 0:
                on[i, j] = 1
    for m in range(markers.shape[0]):
        cy, cx = markers[m, 0], markers[m, 1]
        for i in range(max(0, int(math.floor(cy - radius))), min(n - 1, int(cy + radius) + 1) + 1):
            for j in range(
                max(0, int(math.floor(cx - radius))), min(n - 1, int(cx + radius) + 1) + 1
            ):
                if (i - cy) ** 2 + (j - cx) ** 2 <= r2:
                    on[i, j] = 1
    scale = 255.0 / (block * block)
    for a in range(out):
        for b in range(out):
            s = 0
            for i in range(a * block, (a + 1) * block):
                for j in range(b * block, (b + 1) * block):
                    s += on[i, j]
            image[a, b] = np.uint8(math.floor(s * scale + 0.5))


# --------------------------------------------------------------------------- public API


def _one(
    key: list[int], length: int, p: PathfinderParams, ndis: int, want_info: bool
) -> tuple[np.ndarray, int, dict | None]:
    s = p.antialias
    n = p.raster
    lo = p.padding * s - 0.5  # pixel (i, j) has its centre at (i, j): edges at -0.5, n - 0.5
    hi = n - 0.5 - p.padding * s
    geo = np.array(
        [
            p.paddle_length * s,
            0.5 * p.paddle_thickness * s,
            p.margin * s,
            min(p.margin * s, math.sqrt(2.0)),
            lo,
            hi,
        ]
    )
    radius = p.marker_radius * s
    extra = np.array([p.continuity, radius, p.seed_distance * s])
    tries = np.array([p.n_directions, TARGET_TRIES, DISTRACTOR_TRIES, IMAGE_TRIES], np.int64)
    owner = np.zeros((n, n), np.int16)
    pidx = np.zeros((n, n), np.int16)
    ends = np.zeros((ndis + 3, 4))
    counts = np.zeros(ndis + 3, np.int64)
    draws = _FIRST_DRAWS
    while True:
        rng = np.random.default_rng(key)
        label = int(rng.integers(2))
        u = rng.random(draws)
        status, attempts, placed = _place(
            owner, pidx, geo, extra, length, ndis, distractor_length(length), u, ends, counts, tries
        )
        if status != _NEED_MORE:
            break
        draws *= 4
    if status == _FAILED:
        raise ConfigError(
            f"length {length} snakes could not be placed in {IMAGE_TRIES} tries on a "
            f"{p.window} px window; use a shorter length or a larger window"
        )
    second = ends[1, 2:] if label == 1 else ends[2, 2:]
    markers = np.stack([ends[1, :2], second])
    image = np.empty((p.out_size, p.out_size), np.uint8)
    _render(owner, pidx, markers, radius, n // p.out_size, image)
    info = None
    if want_info:
        info = {
            "label_map": np.where(pidx >= 0, owner, 0).astype(np.int16),
            "markers": markers,
            "ends": ends[1:3].copy(),
            "paddles": counts[: placed + 3].copy(),
            "distractors": placed,
            "distractors_wanted": ndis,
            "attempts": attempts,
            "raster_per_pixel": n // p.out_size,
        }
    return image, label, info


def generate(
    n: int,
    length: int,
    params: PathfinderParams | str,
    seed: int,
    *,
    stream: int = 0,
    return_info: bool = False,
):
    """``n`` Pathfinder images with target snakes of ``length`` paddles.

    Returns ``(images, labels)``: ``uint8`` arrays ``(n, out_size, out_size)`` and
    ``(n,)`` (1: both markers on snake A; 0: one on A, one on B).  Image ``k``
    depends only on ``(seed, length, stream, k)`` and the parameters.  With
    ``return_info=True`` a third item is a list of per-image dicts:
    ``label_map`` (``int16``, raster size: 0 background, 1 snake A, 2 snake B,
    3.. distractors; paddle pixels only, not markers), ``markers`` (2 x (row,
    col) marker centres in raster pixel indices), ``ends`` (A and B: start row,
    start col, end row, end col), ``paddles`` (paddles per snake id),
    ``distractors`` (placed) and ``distractors_wanted``, ``attempts`` (image
    restarts + 1) and ``raster_per_pixel`` (raster px per output px).
    """
    n = _as_int("n", n, 0)
    length = _as_int("length", length, 1)
    seed = _as_int("seed", seed, 0)
    stream = _as_int("stream", stream, 0)
    p = resolve_params(params)
    _check_fits(length, p)
    ndis = p.distractor_count(length)
    images = np.zeros((n, p.out_size, p.out_size), np.uint8)
    labels = np.zeros(n, np.uint8)
    infos = []
    for k in range(n):
        images[k], labels[k], info = _one([seed, length, stream, k], length, p, ndis, return_info)
        if return_info:
            infos.append(info)
    if return_info:
        return images, labels, infos
    return images, labels


def split_stream(split: str) -> int:
    """The random stream of a named split (CRC-32 of its name; stable across runs)."""
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split must be a non-empty string, got {split!r}")
    return zlib.crc32(split.encode())


def cache_name(n: int, length: int, params_name: str, seed: int, split: str) -> str:
    """File name of a cached set: names the parameters (and their hash), n, length, seed, split."""
    p = resolve_params(params_name)
    fields = dataclasses.asdict(p)
    digest = hashlib.sha256(
        json.dumps([GENERATOR_VERSION, fields], sort_keys=True).encode()
    ).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return f"pathfinder-{params_name}-{digest}-L{length}-n{n}-seed{seed}-{safe}.npz"


def load_or_generate(
    cache_dir: str | os.PathLike,
    n: int,
    length: int,
    params_name: str,
    seed: int,
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``generate(n, length, PARAMS[params_name], seed, stream=split_stream(split))``, cached.

    The set is stored as ``cache_dir/<cache_name(...)>`` (``.npz``, written to a
    temporary file and renamed into place).  A cache file that cannot be read or
    does not hold what was asked (shape, dtype, labels, parameters) is
    regenerated and replaced, so wrong data is never returned.
    """
    from implreg.runs import atomic_path

    n = _as_int("n", n, 0)
    length = _as_int("length", length, 1)
    seed = _as_int("seed", seed, 0)
    if not isinstance(params_name, str) or params_name not in PARAMS:
        raise ConfigError(f"params_name must be one of {sorted(PARAMS)}, got {params_name!r}")
    stream = split_stream(split)
    p = PARAMS[params_name]
    folder = Path(cache_dir)
    path = folder / cache_name(n, length, params_name, seed, split)
    meta = json.dumps(
        {
            "version": GENERATOR_VERSION,
            "params": dataclasses.asdict(p),
            "n": n,
            "length": length,
            "seed": seed,
            "split": split,
        },
        sort_keys=True,
    )
    cached = _read_cache(path, n, p.out_size, meta)
    if cached is not None:
        return cached
    images, labels = generate(n, length, p, seed, stream=stream)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, images=images, labels=labels, meta=np.array(meta))
    return images, labels


def _read_cache(path: Path, n: int, size: int, meta: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays when the file is whole and matches; None otherwise."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            images, labels, stored = data["images"], data["labels"], str(data["meta"])
    except Exception:  # noqa: BLE001 - zip/zlib/format errors of a damaged file
        return None
    if (
        stored != meta
        or images.dtype != np.uint8
        or images.shape != (n, size, size)
        or labels.dtype != np.uint8
        or labels.shape != (n,)
        or (labels > 1).any()
    ):
        return None
    return images, labels


def save_examples_figure(
    images: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    ncols: int = 4,
    *,
    max_images: int = 16,
) -> Path:
    """A grid of the first ``max_images`` images titled with their labels; returns the path.

    Drawn with :func:`implreg.runs.pyplot` (Agg) and written by
    :func:`implreg.runs.save_figure` (atomically).
    """
    from implreg.runs import pyplot, save_figure

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or len(images) == 0:
        raise ConfigError(f"images must be a non-empty (n, H, W) array, got shape {images.shape}")
    if labels.shape != (len(images),):
        raise ConfigError(f"labels must have shape ({len(images)},), got {labels.shape}")
    ncols = _as_int("ncols", ncols, 1)
    count = min(len(images), _as_int("max_images", max_images, 1))
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    # uint8 images on their 0-255 scale; float ones (e.g. normalized) on their own range
    lo, hi = (0, 255) if images.dtype == np.uint8 else (float(images.min()), float(images.max()))
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(count):
        ax = axes.ravel()[k]
        ax.imshow(images[k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(
            f"{k}: label {int(labels[k])} ({'same' if labels[k] else 'different'})", fontsize=8
        )
    return save_figure(fig, Path(path))
