"""A scripted pick-and-place expert for LIBERO that reads the simulator's privileged state.

It solves the one-step goals of libero_object (``(in X basket_1_contain_region)``) and
libero_spatial (``(on akita_black_bowl_1 plate_1)``) under openpi's protocol, with no policy and
no renderer. What it reads (see ``docs/expert.md``):

- the goal from the task's ``parsed_problem["goal_state"]`` (one ``in``/``on`` predicate);
- object geometry from *collision* geoms only (visual meshes are larger): every collision geom of
  the object's body subtree, its local box ``geom_aabb`` moved to world with ``geom_xpos`` /
  ``geom_xmat``; from those corners a top, a bottom and a minimum-area xy footprint;
- the target: for ``in`` the success site (centre = what LIBERO's ``In`` tests), for ``on`` the
  target body's xy (LIBERO's ``On``: body xy within 3 cm, contact, target below);
- the hand: ``robot0_eef_pos`` (the grip site) and the grip site's rotation matrix.

Control law (robosuite's OSC_POSE, delta mode: one action unit = 5 cm / 0.5 rad):
``a[:3] = clip(12 (goal - eef) + I, -1, 1)`` with a small clamped integral ``I`` in the precise
phases; ``a[3:6] = clip(3 axis_angle(R_des R_grip^T), -1, 1)`` (world frame: the OSC left-multiplies
the delta); ``R_des = Rz(yaw) R_down`` (gripper down; at yaw 0 the fingers close along world y, as in
LIBERO's home pose); ``a[6]`` = -1 open, +1 close.

Phases: approach -> descend -> grasp -> [slide] -> lift -> transport -> lower -> release -> retreat,
with ``recover`` (object lost: open, back off, re-approach; released off target: approach again) and
``idle`` (out of tries). ``slide`` drags the object out from under an overhang before lifting.

This module needs numpy and a LIBERO env only (no torch, no renderer).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass

import numpy as np

EXPERT_VERSION = "expert-v2"

# ---- constants (metres, radians, action units) ----------------------------------------------------
KP_POS = 12.0  # action units per metre (1 unit = 5 cm OSC offset)
KP_ROT = 3.0  # action units per radian (1 unit = 0.5 rad)
KI_POS = 1.0  # integral gain (action units per metre-step)
I_CLAMP = 0.5  # max |integral contribution| (action units)
I_ZONE = 0.06  # integrate only within 6 cm of the goal
GRIPPER_OPEN, GRIPPER_CLOSE = -1.0, 1.0

HOVER = 0.07  # hover height above the grasp point
DESCEND_XY_TOL = 0.05  # start descending within 5 cm in xy ...
DESCEND_ROT_TOL = 0.15  # ... with the wrist yaw aligned (rad)
GRASP_TOL = 0.008  # grasp point reached
GRASP_STEPS = 10
RELEASE_STEPS = 8
SMALL_OBJECT = 0.055  # both footprint sides below this: keep yaw 0
GRIPPER_SPAN = 0.08  # wider than this (narrow side): pinch the rim
GRIP_BELOW_TOP = 0.03
GRIP_ABOVE_BOTTOM = 0.012
RIM_INSET = 0.012  # rim grasp: this far inside the outer radius ...
RIM_BELOW_TOP = 0.02  # ... and this far below the rim
CARRY_CLEARANCE = 0.04  # object bottom clears obstacles on the path by this
CARRY_MIN_LIFT = 0.06  # carry at least this far above the grasp point
TRAVEL_CLEARANCE = 0.04  # fingertips clear other objects by this while approaching
LOST_DIST = 0.04  # the object left its grasp pose by more than this: lost
MAX_TRIES = 3
STALL_STEPS, STALL_DIST = 12, 0.004
SETTLE_STEPS = 15  # after release: wait this long before judging the placement
ON_XY_TOL = 0.01  # transport -> lower when the object is this close in xy (on)
IN_XY_TOL = 0.015  # ... (in)
LOWER_XY_HOLD = 0.02  # stop descending while the xy error is larger than this
IN_RELEASE_GAP = 0.02  # in: release with the bottom this far above the surface
ON_PUSH = 0.01  # on: aim the bottom this far below the surface; stop at contact
SLIDE_MARGIN = 0.015  # xy margin of the held object when checking for overhangs before lifting

# The grip site frame at yaw 0: local x (the finger axis) -> world y, local y -> world x, z down.
R_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])

_BOX_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)


# ---- small math ----------------------------------------------------------------------------------
def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap_angle(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def wrap_half(a: float) -> float:
    """An angle modulo pi, in [-pi/2, pi/2) (a two-finger grasp is symmetric under a half turn)."""
    return (a + math.pi / 2) % math.pi - math.pi / 2


def axis_angle(R: np.ndarray) -> np.ndarray:
    """The rotation vector (axis * angle) of a rotation matrix, robust near 0 and pi."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if angle < math.pi - 1e-3:
        return v * (angle / (2.0 * math.sin(angle)))
    # near pi: the axis from the symmetric part
    B = (R + np.eye(3)) / 2.0
    axis = np.sqrt(np.clip(np.diag(B), 0.0, None))
    i = int(np.argmax(axis))
    axis = B[i] / max(axis[i], 1e-9)
    axis /= np.linalg.norm(axis)
    if np.dot(axis, v) < 0:
        axis = -axis
    return axis * angle


def desired_rotation(yaw: float) -> np.ndarray:
    """Grip-site rotation pointing down with the fingers closing along (-sin yaw, cos yaw, 0)."""
    return rot_z(yaw) @ R_DOWN


def finger_axis_yaw(R: np.ndarray) -> float:
    """The yaw (as in :func:`desired_rotation`) of a grip-site rotation's finger axis."""
    ax = R[:, 0]
    return wrap_angle(math.atan2(-ax[0], ax[1]))


# ---- geometry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """An object's collision extent: xy minimum-area rectangle + vertical range (world frame)."""

    center: np.ndarray  # xy of the rectangle's centre
    yaw: float  # direction of the narrow side (rad, modulo pi)
    width: float  # narrow side
    length: float  # long side
    top: float
    bottom: float
    radius: float  # max xy distance of a corner from the centre

    @property
    def height(self) -> float:
        return self.top - self.bottom


def geom_box(model, data, g: int):
    """(centre, rotation, half-size) of geom ``g``'s local bounding box, in world coordinates."""
    R = data.geom_xmat[g].reshape(3, 3)
    aabb = model.geom_aabb[g]
    return data.geom_xpos[g] + R @ aabb[:3], R, np.asarray(aabb[3:], dtype=float)


def geom_corners(model, data, geoms) -> np.ndarray:
    """The 8 world corners of each geom's local bounding box, stacked (8 * len(geoms), 3)."""
    out = []
    for g in geoms:
        c, R, h = geom_box(model, data, g)
        out.append(c + (_BOX_SIGNS * h) @ R.T)
    return np.concatenate(out) if out else np.zeros((0, 3))


def footprint_of_points(points: np.ndarray, angle_step_deg: float = 1.0) -> Footprint:
    """Minimum-area xy rectangle (searched over yaw) and z range of a point cloud."""
    xy = points[:, :2]
    best = None
    for deg in np.arange(0.0, 90.0, angle_step_deg):
        a = math.radians(deg)
        u = np.array([math.cos(a), math.sin(a)])
        v = np.array([-u[1], u[0]])
        pu, pv = xy @ u, xy @ v
        wu, wv = pu.max() - pu.min(), pv.max() - pv.min()
        if best is None or wu * wv < best[0] - 1e-12:
            centre = u * (pu.max() + pu.min()) / 2 + v * (pv.max() + pv.min()) / 2
            best = (wu * wv, a, wu, wv, centre)
    _, a, wu, wv, centre = best
    if wu <= wv:
        yaw, width, length = a, wu, wv
    else:
        yaw, width, length = a + math.pi / 2, wv, wu
    radius = float(np.max(np.linalg.norm(xy - centre, axis=1)))
    return Footprint(
        center=centre,
        yaw=wrap_half(yaw),
        width=float(width),
        length=float(length),
        top=float(points[:, 2].max()),
        bottom=float(points[:, 2].min()),
        radius=radius,
    )


def boxes_overlap_many(c1, R1, h1, C2, R2, H2) -> np.ndarray:
    """Separating-axis test of one oriented box against N others -> bool[N] (True: they overlap).

    Boxes are (centre (3), rotation whose columns are the box axes (3x3), half-sizes (3)); the
    others stacked as (N,3), (N,3,3), (N,3). The 15 candidate axes: 3 + 3 face normals and the
    9 edge cross products (a degenerate cross product never separates).
    """
    C2, R2, H2 = np.asarray(C2, float), np.asarray(R2, float), np.asarray(H2, float)
    n = len(C2)
    if n == 0:
        return np.zeros(0, dtype=bool)
    d = C2 - np.asarray(c1, float)  # (N,3)
    A1 = np.broadcast_to(R1.T[None], (n, 3, 3))  # rows = axes of box 1
    A2 = np.transpose(R2, (0, 2, 1))  # rows = axes of the others
    cr = np.cross(A1[:, :, None, :], A2[:, None, :, :]).reshape(n, 9, 3)
    norm = np.linalg.norm(cr, axis=2, keepdims=True)
    cr = np.where(norm > 1e-9, cr / np.maximum(norm, 1e-12), 0.0)
    axes = np.concatenate([A1, A2, cr], axis=1)  # (N,15,3)
    r1 = np.abs(axes @ R1) @ np.asarray(h1, float)  # (N,15)
    r2 = np.einsum("nak,nk->na", np.abs(np.einsum("nai,nik->nak", axes, R2)), H2)
    dist = np.abs(np.einsum("nai,ni->na", axes, d))
    return ~np.any(dist > r1 + r2 + 1e-9, axis=1)


def boxes_overlap(c1, R1, h1, c2, R2, h2) -> bool:
    """Separating-axis test of two oriented boxes (centre, rotation columns = axes, half-sizes)."""
    return bool(boxes_overlap_many(c1, R1, h1, np.asarray(c2)[None], np.asarray(R2)[None], np.asarray(h2)[None])[0])


def segment_points(a_xy, b_xy, step: float = 0.01) -> np.ndarray:
    n = max(2, int(np.linalg.norm(np.asarray(b_xy) - np.asarray(a_xy)) / step) + 1)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.asarray(a_xy)[None] * (1 - t) + np.asarray(b_xy)[None] * t


def unwrap_task_env(env):
    """The LIBERO task env (the one with ``parsed_problem``) inside LiberoEnv / ControlEnv wrappers."""
    x = env
    for _ in range(5):
        if hasattr(x, "parsed_problem"):
            return x
        x = getattr(x, "env", None)
        if x is None:
            break
    raise TypeError(f"{type(env).__name__}: no LIBERO task env (with parsed_problem) inside")


# ---- the expert ------------------------------------------------------------------------------------
class ScriptedExpert:
    """One 7-d OSC action per step from the simulator's privileged state.

    ``ScriptedExpert(env)`` takes LIBERO's ``ControlEnv`` / ``OffScreenRenderEnv`` (or the project's
    ``LiberoEnv``, or the task env itself). Call :meth:`reset` after the env is reset to a new init
    state (a hard reset rebuilds the simulator; the expert re-binds to it on its own). ``act(obs)``
    returns the action; ``phase`` names the current phase.
    """

    def __init__(self, env):
        self.task_env = unwrap_task_env(env)
        goal = self.task_env.parsed_problem["goal_state"]
        if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("in", "on"):
            raise NotImplementedError(f"goal {goal}: the expert handles one (in X Y) or (on X Y) predicate")
        self.predicate, self.obj_name, self.target_name = (str(s) for s in goal[0])
        self.predicate = self.predicate.lower()
        self._sim = None
        self.reset()

    # ---- binding to the simulator ------------------------------------------------------------------
    def _bind(self) -> None:
        env = self.task_env
        self._sim = env.sim
        m, d = env.sim.model._model, env.sim.data._data
        self.m, self.d = m, d
        self.site_grip = int(env.sim.model.site_name2id("gripper0_grip_site"))
        # body -> root object body (of the task's objects and fixtures)
        roots = {int(bid): name for name, bid in env.obj_body_id.items()}
        self.body_root = {}
        for b in range(m.nbody):
            x = b
            while x not in roots and x != 0:
                x = int(m.body_parentid[x])
            self.body_root[b] = roots.get(x)
        self.obj_geoms: dict[str, list[int]] = {name: [] for name in env.obj_body_id}
        for g in range(m.ngeom):
            if m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0:
                continue  # visual only
            root = self.body_root.get(int(m.geom_bodyid[g]))
            if root is not None:
                self.obj_geoms[root].append(g)
        self.obj_bid = int(env.obj_body_id[self.obj_name])
        self.obj_geom_set = set(self.obj_geoms[self.obj_name])
        if self.target_name in env.obj_body_id:
            self.target_kind = "body"
            self.target_id = int(env.obj_body_id[self.target_name])
            self.target_root = self.target_name
        else:
            try:
                sid = int(env.sim.model.site_name2id(self.target_name))
            except Exception:  # noqa: BLE001 - robosuite raises ValueError for an unknown name
                sid = -1
            if sid < 0:
                raise KeyError(f"target {self.target_name!r}: neither an object body nor a site")
            self.target_kind = "site"
            self.target_id = int(sid)
            self.target_root = self.body_root.get(int(m.site_bodyid[sid]))
        self.target_geom_set = set(self.obj_geoms.get(self.target_root, []))
        self.region_half = None
        if self.target_kind == "site" and self.target_name in getattr(env, "object_sites_dict", {}):
            size = np.asarray(env.object_sites_dict[self.target_name].size, dtype=float)
            self.region_half = size

    def reset(self) -> None:
        """Forget the episode (call after the env was reset to a new init state)."""
        self._sim = None
        self.phase = "approach"
        self.t = 0
        self.phase_t = 0
        self.tries = 0
        self.plan = None  # grasp plan: dict(p_local, yaw_rel, rim)
        self.yaw = None  # desired wrist yaw of the current attempt
        self.rel = None  # object pos in the grip frame at grasp
        self.carry_z = None
        self.carry_bottom = -np.inf
        self.carry_min = -np.inf
        self.integral = np.zeros(3)
        self.hist: list[np.ndarray] = []
        self.hold_pos = None
        self.phases_seen: list[str] = ["approach"]
        self.flips = 0
        self.bad_grasps: list[np.ndarray] = []
        self.slide_goal = None  # grasp points (object frame) that proved blocked
        self._bind()

    # ---- state readers ------------------------------------------------------------------------------
    def object_points(self, name: str | None = None) -> np.ndarray:
        return geom_corners(self.m, self.d, self.obj_geoms[name or self.obj_name])

    def footprint(self, name: str | None = None) -> Footprint:
        """The collision footprint of a task object (default: the one to move)."""
        if self._sim is not self.task_env.sim:
            self._bind()
        return footprint_of_points(self.object_points(name))

    def obj_pos(self) -> np.ndarray:
        return self.d.xpos[self.obj_bid].copy()

    def obj_rot(self) -> np.ndarray:
        return self.d.xmat[self.obj_bid].reshape(3, 3).copy()

    def target_pos(self) -> np.ndarray:
        if self.target_kind == "body":
            return self.d.xpos[self.target_id].copy()
        return self.d.site_xpos[self.target_id].copy()

    def target_surface(self, xy) -> float:
        """Top of the target's collision geoms under xy (what the object comes to rest on)."""
        best = None
        site_z = self.target_pos()[2] if self.target_kind == "site" else None
        for g in self.obj_geoms.get(self.target_root, []):
            c, R, h = geom_box(self.m, self.d, g)
            corners = c + (_BOX_SIGNS * h) @ R.T
            lo, hi = corners[:, :2].min(0), corners[:, :2].max(0)
            if np.all(xy >= lo) and np.all(xy <= hi):
                top = corners[:, 2].max()
                if site_z is not None and top > site_z:
                    continue  # a wall around the region, not its floor
                best = top if best is None else max(best, top)
        if best is None:
            if self.target_kind == "site" and self.region_half is not None:
                return float(self.target_pos()[2] - self.region_half[2])
            return float(self.target_pos()[2])
        return float(best)

    def in_contact_with_target(self) -> bool:
        d = self.d
        n = d.ncon
        if n == 0 or not self.target_geom_set:
            return False
        g1, g2 = d.contact.geom1[:n], d.contact.geom2[:n]
        for a, b in zip(g1, g2, strict=True):
            a, b = int(a), int(b)
            if (a in self.obj_geom_set and b in self.target_geom_set) or (
                b in self.obj_geom_set and a in self.target_geom_set
            ):
                return True
        return False

    def goal_satisfied(self) -> bool:
        return bool(self.task_env._check_success())

    # ---- planning --------------------------------------------------------------------------------------
    def _others(self, exclude=()):
        """World boxes of every other task object's collision geoms: (centres, rotations, halves)."""
        ids = [
            g for name, geoms in self.obj_geoms.items() if name != self.obj_name and name not in exclude for g in geoms
        ]
        if not ids:
            return np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3))
        ids = np.asarray(ids)
        R = self.d.geom_xmat[ids].reshape(-1, 3, 3)
        aabb = self.m.geom_aabb[ids]
        C = self.d.geom_xpos[ids] + np.einsum("nij,nj->ni", R, aabb[:, :3])
        return C, R, np.asarray(aabb[:, 3:], dtype=float)

    @staticmethod
    def _box_extents(C, R, H):
        """World AABBs (lo (N,3), hi (N,3)) of stacked oriented boxes."""
        ext = np.einsum("nij,nj->ni", np.abs(R), H)
        return C - ext, C + ext

    def _tallest_on_path(self, pts, grow: float) -> float:
        """Top of the tallest other object whose xy box (grown) covers a point of the path."""
        C, R, H = self._others()
        if len(C) == 0:
            return -np.inf
        lo, hi = self._box_extents(C, R, H)
        lo2, hi2 = lo[:, None, :2] - grow, hi[:, None, :2] + grow
        inside = np.all((pts[None, :, :] >= lo2) & (pts[None, :, :] <= hi2), axis=2)
        hit = np.any(inside, axis=1)
        return float(hi[hit, 2].max()) if np.any(hit) else -np.inf

    def _gripper_boxes(self, p, yaw, sweep: float = HOVER, grow: float = 0.0):
        """A box model of the open gripper at grasp point p, swept up by ``sweep`` (the descent).

        Measured on the open Panda gripper, in the grip-site frame (x = finger axis, heights above
        the site): finger tips 3.9-5.4 cm either side, -1 to 1.5 cm high; finger knuckles 4.0-6.6 cm,
        1.5-4.5 cm high (both +-1 cm across); the hand +-10.4 cm along the finger axis, +-2.1 cm
        across from 3.1 to 6 cm high, +-3.2 cm across above.
        """
        R = desired_rotation(yaw)
        ax = R[:, 0]  # finger axis
        Rb = rot_z(yaw + math.pi / 2)  # box axes: x = finger axis, y = across, z = up
        parts = [  # (x from, x to, half across, height from, height to)
            (0.039, 0.054, 0.010, -0.010, 0.015),
            (0.040, 0.066, 0.010, 0.015, 0.045),
        ]
        boxes = []
        for x0, x1, hy, z0, z1 in parts:
            for sgn in (-1.0, 1.0):
                c = p + sgn * (x0 + x1) / 2 * ax + np.array([0.0, 0.0, (z0 + z1 + sweep) / 2])
                boxes.append((c, Rb, np.array([(x1 - x0) / 2, hy, (z1 + sweep - z0) / 2]) + grow))
        for hy, z0, z1 in ((0.021, 0.031, 0.06), (0.032, 0.06, 0.124)):
            c = p + np.array([0.0, 0.0, (z0 + z1 + sweep) / 2])
            boxes.append((c, Rb, np.array([0.104, hy, (z1 + sweep - z0) / 2]) + grow))
        return boxes

    def _gripper_collides(self, p, yaw, others=None, grow: float = 0.0) -> bool:
        C, R, H = self._others() if others is None else others
        if len(C) == 0:
            return False
        near = np.linalg.norm(C[:, :2] - p[:2], axis=1) < 0.35 + np.linalg.norm(H, axis=1)  # cheap pre-filter
        C, R, H = C[near], R[near], H[near]
        for c1, R1, h1 in self._gripper_boxes(p, yaw, grow=grow):
            if np.any(boxes_overlap_many(c1, R1, h1, C, R, H)):
                return True
        return False

    def _plan_grasp(self) -> dict:
        fp = footprint_of_points(self.object_points())
        x_obj, R_obj = self.obj_pos(), self.obj_rot()
        obj_yaw = math.atan2(R_obj[1, 0], R_obj[0, 0])
        others = self._others()
        candidates = []  # (grasp point, yaw), most preferred first
        if fp.width <= GRIPPER_SPAN:
            rim = False
            z = max(fp.top - GRIP_BELOW_TOP, fp.bottom + GRIP_ABOVE_BOTTOM)
            narrow = wrap_half(fp.yaw - math.pi / 2)  # finger axis along the narrow side
            across = wrap_half(fp.yaw)  # finger axis along the long side
            yaws = [0.0, narrow, across] if fp.length < SMALL_OBJECT else [narrow]
            if fp.length >= SMALL_OBJECT and fp.length < GRIPPER_SPAN - 0.005:
                yaws.append(across)
            long_dir = np.array([math.cos(fp.yaw + math.pi / 2), math.sin(fp.yaw + math.pi / 2)])
            max_off = max(0.0, fp.length / 2 - 0.02)
            offsets = [0.0] + [s * k * 0.01 for k in range(1, 4) for s in (1, -1) if k * 0.01 <= max_off]
            for off in offsets:
                for yaw in yaws:
                    xy = fp.center + off * long_dir
                    candidates.append((np.array([xy[0], xy[1], z]), yaw))
        else:  # too wide for the fingers: pinch the rim, one finger inside, fingers radial
            rim = True
            r = (fp.width + fp.length) / 4.0  # radius of a round object (corners overestimate it)
            z = fp.top - RIM_BELOW_TOP
            dirs = [(0, 1), (0, -1), (-1, 0), (-1, 1), (-1, -1), (1, 1), (1, -1), (1, 0)]
            angles = [math.atan2(dy, dx) for dx, dy in dirs]
            # then the directions between those, least wrist rotation first, near side first
            extra = [math.radians(22.5 + 45 * k) for k in range(8)]
            extra.sort(key=lambda ang: (round(abs(wrap_half(ang - math.pi / 2)), 3), math.cos(ang)))
            pts = self.object_points()
            for ang in angles + extra:
                u = np.array([math.cos(ang), math.sin(ang)])
                xy = fp.center + u * (r - RIM_INSET)
                near = np.linalg.norm(pts[:, :2] - xy, axis=1) < 0.025  # the rim there (a bowl may tilt)
                z_here = (pts[near, 2].max() if np.any(near) else fp.top) - RIM_BELOW_TOP
                p = np.array([xy[0], xy[1], z_here])
                candidates.append((p, wrap_half(ang - math.pi / 2)))
        bad = [c for c in getattr(self, "bad_grasps", [])]

        def is_bad(p, yaw):
            local = R_obj.T @ (p - x_obj)
            return any(np.linalg.norm(local - b) < 0.01 for b in bad)

        candidates = [c for c in candidates if not is_bad(*c)] or candidates
        p, yaw = candidates[0]
        clear = False
        for grow in (0.005, 0.0):  # with a 5 mm margin first
            for cand_p, cand_yaw in candidates:
                if not self._gripper_collides(cand_p, cand_yaw, others, grow=grow):
                    p, yaw, clear = cand_p, cand_yaw, True
                    break
            if clear:
                break
        return {
            "p_local": R_obj.T @ (p - x_obj),
            "yaw_rel": wrap_angle(yaw - obj_yaw),
            "rim": rim,
            "clear": clear,
            "fp": fp,
        }

    def _grasp_point(self):
        x_obj, R_obj = self.obj_pos(), self.obj_rot()
        obj_yaw = math.atan2(R_obj[1, 0], R_obj[0, 0])
        return x_obj + R_obj @ self.plan["p_local"], wrap_half(self.plan["yaw_rel"] + obj_yaw)

    def _travel_z(self, a_xy, b_xy, base_z) -> float:
        """Fingertip height that clears every other object on the straight xy path a -> b."""
        top = self._tallest_on_path(segment_points(a_xy, b_xy, 0.02), 0.05)
        return max(base_z, top + TRAVEL_CLEARANCE)

    def _plan_carry(self, eef) -> float:
        """Carry height of the hand; sets ``carry_bottom``, the height the object's bottom must clear.

        The object's bottom clears by 4 cm the tallest thing whose footprint (grown by the object's
        radius) lies on the straight path to the target; the hand at least 6 cm above the grasp.
        The lift and transport phases hold the *measured* bottom at ``carry_bottom`` (an object held
        at its rim tilts and hangs lower than at grasp time).
        """
        fp = footprint_of_points(self.object_points())
        pts = segment_points(self.obj_pos()[:2], self.target_pos()[:2], 0.01)
        top = self._tallest_on_path(pts, fp.radius + 0.01)
        self.carry_min = float(eef[2] + CARRY_MIN_LIFT)
        self.carry_bottom = float(top + CARRY_CLEARANCE) if np.isfinite(top) else -np.inf
        hand_above_bottom = eef[2] - fp.bottom
        return float(max(self.carry_bottom + hand_above_bottom, self.carry_min))

    def _carry_goal_z(self, eef) -> float:
        """Hand height that puts the held object's measured bottom at ``carry_bottom`` (>= carry_min)."""
        bottom = float(self.object_points()[:, 2].min())
        return max(self.carry_min, eef[2] + (self.carry_bottom - bottom))

    def _slide_out(self, lift: float):
        """xy shift that takes the held object out from under anything above it (None: none needed).

        "Above" = other objects' collision geoms whose bottom is above the object's mid-height and
        that overlap the column the object sweeps when lifted by ``lift``. The smallest shift (16
        directions, 5 mm steps up to 8 cm) that clears them wins; ties go toward the target.
        """
        fp = footprint_of_points(self.object_points())
        C, R, H = self._others()
        if len(C) == 0:
            return None
        lo, hi = self._box_extents(C, R, H)
        mid = (fp.top + fp.bottom) / 2
        over = (lo[:, 2] > mid) & (lo[:, 2] < fp.top + lift)
        if not np.any(over):
            return None
        C, R, H = C[over], R[over], H[over]
        Rb = rot_z(fp.yaw)
        z0, z1 = fp.bottom + 0.005, fp.top + lift
        # 1.5 cm margin in xy: an object held at one edge tilts and swings a little when lifted
        half = np.array([fp.width / 2 + SLIDE_MARGIN, fp.length / 2 + SLIDE_MARGIN, (z1 - z0) / 2])

        def blocked(shift):
            c = np.array([fp.center[0] + shift[0], fp.center[1] + shift[1], (z0 + z1) / 2])
            return bool(np.any(boxes_overlap_many(c, Rb, half, C, R, H)))

        if not blocked(np.zeros(2)):
            return None
        to_target = self.target_pos()[:2] - fp.center
        to_target = to_target / max(np.linalg.norm(to_target), 1e-9)
        dirs = [np.array([math.cos(a), math.sin(a)]) for a in np.radians(np.arange(0, 360, 22.5))]
        dirs.sort(key=lambda u: -float(u @ to_target))
        for k in range(1, 17):
            for u in dirs:
                if not blocked(u * 0.005 * k):
                    return u * (0.005 * k + 0.005)
        return None

    # ---- control ----------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.phase_t = 0
            self.integral[:] = 0.0
            self.hist = []
            self.phases_seen.append(phase)

    def _stalled(self) -> bool:
        if len(self.hist) <= STALL_STEPS:
            return False
        return float(np.linalg.norm(self.hist[-1] - self.hist[-1 - STALL_STEPS])) < STALL_DIST

    def _pos_action(self, err, integrate: bool) -> np.ndarray:
        err = np.asarray(err, dtype=float)
        if integrate:
            near = np.abs(err) < I_ZONE
            self.integral = np.where(near, self.integral + err, 0.0)
            i_term = np.clip(KI_POS * self.integral, -I_CLAMP, I_CLAMP)
        else:
            i_term = 0.0
        return np.clip(KP_POS * err + i_term, -1.0, 1.0)

    def _rot_action(self, R_cur, yaw) -> tuple[np.ndarray, float]:
        e = axis_angle(desired_rotation(yaw) @ R_cur.T)
        return np.clip(KP_ROT * e, -1.0, 1.0), float(np.linalg.norm(e))

    def act(self, obs: dict | None = None) -> np.ndarray:
        if self._sim is not self.task_env.sim:
            self._bind()
        d = self.d
        if obs is not None and "robot0_eef_pos" in obs:
            eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        else:
            eef = d.site_xpos[self.site_grip].copy()
        R_cur = d.site_xmat[self.site_grip].reshape(3, 3).copy()
        self.hist.append(eef.copy())
        if len(self.hist) > 4 * STALL_STEPS:
            self.hist = self.hist[-2 * STALL_STEPS :]
        action = self._step(eef, R_cur)
        self.t += 1
        self.phase_t += 1
        return action

    def _held_ok(self, eef, R_cur) -> bool:
        if self.rel is None:
            return True
        expect = eef + R_cur @ self.rel
        return float(np.linalg.norm(expect - self.obj_pos())) <= LOST_DIST

    def _lost(self) -> None:
        self.tries += 1
        self.rel = None
        self._set_phase("recover")

    def _step(self, eef, R_cur) -> np.ndarray:
        a = np.zeros(7)
        ph = self.phase

        if ph == "recover":  # open and back off up, then re-approach
            a[:3] = self._pos_action([0.0, 0.0, 0.06 if self.phase_t < RELEASE_STEPS else 0.0], False)
            a[6] = GRIPPER_OPEN
            if self.yaw is not None:
                a[3:6], _ = self._rot_action(R_cur, self.yaw)
            if self.phase_t >= RELEASE_STEPS + 2:
                self.plan = None
                self._set_phase("approach" if self.tries <= MAX_TRIES else "idle")
            return a

        if ph == "idle":
            a[6] = GRIPPER_OPEN
            return a

        if ph in ("approach", "descend"):
            if self.plan is None:
                self.plan = self._plan_grasp()
                self.yaw = None
            p, yaw = self._grasp_point()
            if self.yaw is None or abs(wrap_half(self.yaw - yaw)) > 0.35:
                self.yaw = self._closest_yaw(yaw, R_cur)
            else:  # follow small yaw changes of the object, keep the branch (mod pi) we chose
                self.yaw = self.yaw + wrap_half(yaw - self.yaw)
            a[3:6], rot_err = self._rot_action(R_cur, self.yaw)
            a[6] = GRIPPER_OPEN
            xy_err = float(np.linalg.norm(p[:2] - eef[:2]))
            if ph == "approach":
                hover = p + np.array([0.0, 0.0, HOVER])
                goal = hover.copy()
                if xy_err > DESCEND_XY_TOL:
                    goal[2] = self._travel_z(eef[:2], p[:2], hover[2])
                a[:3] = self._pos_action(goal - eef, False)
                if xy_err < DESCEND_XY_TOL and rot_err < DESCEND_ROT_TOL and abs(eef[2] - hover[2]) < 0.03:
                    self._set_phase("descend")
                elif self._stalled():
                    if xy_err < 0.02:
                        self._set_phase("descend")
                    else:
                        self.yaw = wrap_angle(self.yaw + math.pi)
                        self.flips += 1
                        self.hist = []
                return a
            # descend: straight down onto the grasp point (xy first when off)
            goal = p.copy()
            if xy_err > 0.015:
                goal[2] = max(p[2], eef[2] - 0.01)
            a[:3] = self._pos_action(goal - eef, True)
            if np.linalg.norm(p - eef) < GRASP_TOL or (self._stalled() and abs(eef[2] - p[2]) < 0.02):
                self.hold_pos = eef.copy()
                self._set_phase("grasp")
            elif self._stalled() and self.phase_t > 30:
                # blocked above the grasp point: remember this grasp as bad, plan another one
                self.bad_grasps.append(self.plan["p_local"].copy())
                self.plan = None
                self._set_phase("approach")
            return a

        if ph == "grasp":
            a[:3] = self._pos_action(self.hold_pos - eef, False)
            a[3:6], _ = self._rot_action(R_cur, self.yaw)
            a[6] = GRIPPER_CLOSE
            if self.phase_t + 1 >= GRASP_STEPS:
                self.rel = R_cur.T @ (self.obj_pos() - eef)
                self.carry_z = self._plan_carry(eef)
                self.lift_xy = eef[:2].copy()
                shift = self._slide_out(self.carry_z - eef[2])
                if shift is not None and np.linalg.norm(shift) > 0:
                    self.lift_xy = eef[:2] + shift
                    self.slide_goal = np.array([*self.lift_xy, eef[2] + 0.004])
                    self._set_phase("slide")
                else:
                    self._set_phase("lift")
            return a

        if ph in ("slide", "lift", "transport", "lower"):
            a[6] = GRIPPER_CLOSE
            a[3:6], _ = self._rot_action(R_cur, self.yaw)
            if not self._held_ok(eef, R_cur):
                self._lost()
                a[6] = GRIPPER_OPEN
                return a
            tgt = self.target_pos()
            obj = self.obj_pos()
            e_xy = tgt[:2] - obj[:2]
            dist_xy = float(np.linalg.norm(e_xy))
            if ph == "slide":  # drag the object out from under an overhang before lifting
                a[:3] = self._pos_action(self.slide_goal - eef, True)
                if np.linalg.norm(self.slide_goal[:2] - eef[:2]) < 0.006 or self._stalled():
                    self.lift_xy = eef[:2].copy()
                    self._set_phase("lift")
                return a
            if ph == "lift":
                self.carry_z = self._carry_goal_z(eef)
                goal = np.array([self.lift_xy[0], self.lift_xy[1], self.carry_z])
                a[:3] = self._pos_action(goal - eef, False)
                if eef[2] > self.carry_z - 0.015 or (self._stalled() and eef[2] > self.carry_z - 0.05):
                    self._set_phase("transport")
                return a
            tol = ON_XY_TOL if self.predicate == "on" else IN_XY_TOL
            if ph == "transport":
                self.carry_z = self._carry_goal_z(eef)
                err = np.array([e_xy[0], e_xy[1], self.carry_z - eef[2]])
                a[:3] = self._pos_action(err, True)
                if dist_xy < tol or (self._stalled() and dist_xy < 0.025):
                    self._set_phase("lower")
                return a
            # lower
            fp = footprint_of_points(self.object_points())
            surface = self.target_surface(tgt[:2])
            if self.predicate == "in":
                stop = surface + IN_RELEASE_GAP
            else:
                stop = surface - ON_PUSH
            dz = stop - fp.bottom
            if dist_xy > LOWER_XY_HOLD:
                dz = max(dz, 0.0)
            a[:3] = self._pos_action(np.array([e_xy[0], e_xy[1], dz]), True)
            touching = self.predicate == "on" and self.in_contact_with_target()
            reached = fp.bottom <= stop + 0.004 if self.predicate == "in" else fp.bottom <= surface + 0.002
            stalled = self._stalled() and self.phase_t > STALL_STEPS
            if (touching or reached or stalled) and dist_xy < 0.025:
                self.hold_pos = eef.copy()
                self._set_phase("release")
            return a

        if ph == "release":
            a[:3] = self._pos_action(self.hold_pos - eef, False)
            a[3:6], _ = self._rot_action(R_cur, self.yaw)
            a[6] = GRIPPER_OPEN
            if self.phase_t + 1 >= RELEASE_STEPS:
                self.rel = None
                self._set_phase("retreat")
            return a

        if ph == "retreat":
            goal = self.hold_pos + np.array([0.0, 0.0, 0.10])
            a[:3] = self._pos_action(goal - eef, False)
            a[3:6], _ = self._rot_action(R_cur, self.yaw)
            a[6] = GRIPPER_OPEN
            if self.phase_t >= SETTLE_STEPS and not self.goal_satisfied():
                tgt, obj = self.target_pos(), self.obj_pos()
                if np.linalg.norm(tgt[:2] - obj[:2]) > 0.02 or self.predicate == "in":
                    self.tries += 1
                    self.plan = None
                    self._set_phase("approach" if self.tries <= MAX_TRIES else "idle")
            return a

        raise RuntimeError(f"unknown phase {ph!r}")

    def _closest_yaw(self, yaw: float, R_cur) -> float:
        """Of yaw and yaw + pi (the same grasp), the one nearer the wrist's current yaw."""
        cur = finger_axis_yaw(R_cur)
        a, b = yaw, wrap_angle(yaw + math.pi)
        return a if abs(wrap_angle(a - cur)) <= abs(wrap_angle(b - cur)) else b


# ---- one episode ----------------------------------------------------------------------------------------
DUMMY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def run_expert_episode(
    env,
    init_state,
    seed: int = 7,
    *,
    max_steps: int,
    num_steps_wait: int = 10,
    action_noise: float = 0.0,
    noise_seed: int = 0,
    on_step=None,
    expert: ScriptedExpert | None = None,
) -> dict:
    """One episode of the expert under openpi's protocol, as :class:`EpisodeRunner` runs a policy.

    ``env.seed(seed)``; ``env.reset()``; ``obs = env.set_init_state(init_state)``; ``num_steps_wait``
    steps of ``[0,0,0,0,0,0,-1]``; then expert actions until ``done`` or ``max_steps +
    num_steps_wait`` env steps in all. ``action_noise`` > 0 adds Gaussian noise (std in action units,
    arm dims 0..5 only, clipped to [-1, 1], seeded by ``noise_seed``) to the *executed* action;
    ``on_step(obs_before, label, executed, t)`` gets the clean expert label of every expert step
    (``t`` = env step index, wait steps included). An exception ends the episode as a failure
    (``error`` holds its text), as in the protocol.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(noise_seed) if action_noise > 0 else None
    budget = int(max_steps) + int(num_steps_wait)
    t, success, error, tb = 0, False, None, None
    try:
        env.seed(seed)
        env.reset()
        obs = env.set_init_state(init_state)
        if expert is None:
            expert = ScriptedExpert(env)
        else:
            expert.reset()
        while t < num_steps_wait:
            obs, _r, done, _i = env.step(list(DUMMY))
            t += 1
            if done:
                success = True
                break
        while not success and t < budget:
            label = expert.act(obs)
            executed = label.copy()
            if rng is not None:
                executed[:6] = np.clip(executed[:6] + rng.normal(0.0, action_noise, 6), -1.0, 1.0)
            if on_step is not None:
                on_step(obs, label, executed, t)
            obs, _r, done, _i = env.step(executed.tolist())
            t += 1
            if done:
                success = True
    except Exception as exc:  # noqa: BLE001 - the protocol: an exception ends the episode as a failure
        error = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=8)
    return {
        "success": bool(success),
        "steps": t,
        "max_steps": int(max_steps),
        "seed": int(seed),
        "phase": getattr(expert, "phase", None),
        "phases": list(getattr(expert, "phases_seen", [])),
        "tries": getattr(expert, "tries", 0),
        "action_noise": float(action_noise),
        "noise_seed": int(noise_seed),
        "error": error,
        "traceback": tb,
        "wall_s": round(time.perf_counter() - t0, 3),
        "expert_version": EXPERT_VERSION,
    }
