"""Tests for stages/core/geometry.py: conventions by hand-computed values, invariants by hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core import geometry as g
from stages.core.errors import InputError

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def random_rotation(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    quat = rng.normal(size=(4,) if n is None else (n, 4))
    return g.quat_to_rotmat(quat)


def random_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return random_rotation(rng), rng.normal(scale=3.0, size=3)


# --- rotations ------------------------------------------------------------------------------------


def test_quaternion_known_value_90deg_about_z():
    s = math.sqrt(0.5)
    R = g.quat_to_rotmat([s, 0.0, 0.0, s])
    np.testing.assert_allclose(R, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(R @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-15)  # x -> y
    np.testing.assert_allclose(g.rotmat_to_quat(R), [s, 0.0, 0.0, s], atol=1e-15)


def test_quat_to_rotmat_normalises_and_rotmat_to_quat_gives_w_nonnegative():
    np.testing.assert_allclose(g.quat_to_rotmat([2.0, 0, 0, 0]), np.eye(3))
    q = g.rotmat_to_quat(g.quat_to_rotmat([-0.5, 0.5, 0.5, 0.5]))
    np.testing.assert_allclose(q, [0.5, -0.5, -0.5, -0.5], atol=1e-15)
    # 180 degrees about x: w = 0, the x-formula branch is the one used
    np.testing.assert_allclose(g.rotmat_to_quat(np.diag([1.0, -1.0, -1.0])), [0, 1, 0, 0], atol=1e-15)


@SETTINGS
@given(seeds)
def test_quaternion_round_trip(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(8, 4))
    q[:2] = [[1e-9, 1, 0, 0], [1, 0, 0, 1e-9]]  # near the branch boundaries
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    q = np.where(q[:, :1] < 0, -q, q)
    R = g.quat_to_rotmat(q)
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(g.rotmat_to_quat(R), q, atol=1e-12)


def test_rotation_shapes_are_checked():
    with pytest.raises(InputError, match=r"\[\.\.\., 4\]"):
        g.quat_to_rotmat([1.0, 0.0, 0.0])
    with pytest.raises(InputError, match=r"\[\.\.\., 3, 3\]"):
        g.rotmat_to_quat(np.eye(4))
    with pytest.raises(InputError, match="zero-length"):
        g.quat_to_rotmat([0.0, 0.0, 0.0, 0.0])


def test_rotation_angle_known_values_and_small_angles():
    assert g.rotation_angle_deg(np.eye(3), g.quat_to_rotmat([1, 0, 0, 0])) == 0.0
    half = math.radians(45.0)
    Rz90 = g.quat_to_rotmat([math.cos(half), 0, 0, math.sin(half)])
    np.testing.assert_allclose(g.rotation_angle_deg(np.eye(3), Rz90), 90.0, atol=1e-12)
    np.testing.assert_allclose(g.rotation_angle_deg(np.eye(3), np.diag([1.0, -1, -1])), 180.0, atol=1e-12)
    tiny = 1e-7  # radians: a clipped acos would lose it entirely
    R_tiny = g.quat_to_rotmat([math.cos(tiny / 2), math.sin(tiny / 2), 0, 0])
    np.testing.assert_allclose(g.rotation_angle_deg(np.eye(3), R_tiny), math.degrees(tiny), rtol=1e-6)


@SETTINGS
@given(seeds, st.floats(min_value=0.0, max_value=1.0))
def test_slerp_endpoints_unit_norm_and_constant_speed(seed, t):
    rng = np.random.default_rng(seed)
    q0, q1 = rng.normal(size=(2, 4))
    R0, R1 = g.quat_to_rotmat(q0), g.quat_to_rotmat(q1)
    np.testing.assert_allclose(g.quat_to_rotmat(g.slerp(q0, q1, 0.0)), R0, atol=1e-12)
    np.testing.assert_allclose(g.quat_to_rotmat(g.slerp(q0, q1, 1.0)), R1, atol=1e-12)
    q_t = g.slerp(q0, q1, t)
    np.testing.assert_allclose(np.linalg.norm(q_t), 1.0, atol=1e-12)
    assert q_t[0] >= 0
    total = g.rotation_angle_deg(R0, R1)  # shortest arc: angle at t is t * total
    np.testing.assert_allclose(g.rotation_angle_deg(R0, g.quat_to_rotmat(q_t)), t * total, atol=1e-6)
    np.testing.assert_allclose(g.rotation_angle_deg(g.quat_to_rotmat(q_t), R1), (1 - t) * total, atol=1e-6)


def test_slerp_midpoint_vectorised_short_path_and_nearly_equal():
    q0 = np.array([1.0, 0, 0, 0])
    q1 = np.array([math.cos(math.radians(45)), 0, 0, math.sin(math.radians(45))])  # 90 deg about z
    mids = g.slerp(q0, -q1, np.array([0.0, 0.5, 1.0]))  # -q1: same rotation, must still go short way
    assert mids.shape == (3, 4)
    np.testing.assert_allclose(mids[1], [math.cos(math.radians(22.5)), 0, 0, math.sin(math.radians(22.5))], atol=1e-15)
    q_near = np.array([1.0, 1e-9, 0, 0])
    np.testing.assert_allclose(g.slerp(q0, q_near, 0.5), [1.0, 5e-10, 0, 0], atol=1e-15)
    np.testing.assert_array_equal(g.slerp(q0, q0, 0.3), q0)  # identical: no 0/0 from sin(theta)


# --- poses ----------------------------------------------------------------------------------------


def test_relative_pose_hand_computed_code12():
    Rz90 = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    R_s, T_s = np.eye(3), np.array([1.0, 2.0, 3.0])
    R_t, T_t = Rz90, np.array([0.0, 0.0, 5.0])
    R_rel, T_rel = g.relative_pose(R_s, T_s, R_t, T_t)
    np.testing.assert_allclose(R_rel, Rz90)
    np.testing.assert_allclose(T_rel, [0 - (-2), 0 - 1, 5 - 3])  # T_t - Rz90 @ (1, 2, 3) = T_t - (-2, 1, 3)
    np.testing.assert_allclose(g.pose_code12(R_rel, T_rel), [0, -1, 0, 2, 1, 0, 0, -1, 0, 0, 1, 2])


@SETTINGS
@given(seeds)
def test_apply_relative_pose_recovers_target(seed):
    rng = np.random.default_rng(seed)
    R_s, T_s = random_rotation(rng, 5), rng.normal(size=(5, 3))
    R_t, T_t = random_rotation(rng, 5), rng.normal(size=(5, 3))
    R_rel, T_rel = g.relative_pose(R_s, T_s, R_t, T_t)
    code = g.pose_code12(R_rel, T_rel)
    assert code.shape == (5, 12)
    np.testing.assert_allclose(code.reshape(5, 3, 4)[..., 3], T_rel)
    R_back, T_back = g.apply_relative_pose(R_rel, T_rel, R_s, T_s)
    np.testing.assert_allclose(R_back, R_t, atol=1e-12)
    np.testing.assert_allclose(T_back, T_t, atol=1e-12)


def test_ring_pose_frontal_is_identity_and_frame_directions():
    R, T = g.ring_pose(0.0, 0.0, 2.5)
    np.testing.assert_allclose(R, np.eye(3), atol=1e-15)
    np.testing.assert_allclose(g.camera_centers(R, T), [0, 0, -2.5], atol=1e-15)
    C = g.camera_centers(*g.ring_pose([90.0, 0.0], [0.0, 30.0], 2.0))
    np.testing.assert_allclose(C[0], [2.0, 0, 0], atol=1e-12)  # positive azimuth: toward +x
    np.testing.assert_allclose(C[1], [0, -1.0, -math.sqrt(3)], atol=1e-12)  # elevation up: toward -y


def test_ring_pose_target_and_batch():
    az = np.array([[-45.0, 0.0, 45.0]])
    R, T = g.ring_pose(az, 10.0, 3.0, target=(0.1, 0.2, 0.3))
    assert R.shape == (1, 3, 3, 3) and T.shape == (1, 3, 3)
    centres = g.camera_centers(R, T)
    np.testing.assert_allclose(np.linalg.norm(centres - [0.1, 0.2, 0.3], axis=-1), 3.0)
    np.testing.assert_allclose(R[..., 2, :], -(centres - [0.1, 0.2, 0.3]) / 3.0, atol=1e-12)


@SETTINGS
@given(seeds)
def test_look_at_centre_target_and_up(seed):
    rng = np.random.default_rng(seed)
    center, target = rng.normal(scale=3.0, size=3), rng.normal(size=3)
    R, T = g.look_at(center, target)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(g.camera_centers(R, T), center, atol=1e-12)
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    uv, z = g.project(np.stack([target, target + [0.0, -0.1, 0.0]]), K, R, T)  # target, point above it
    np.testing.assert_allclose(uv[0], [320, 240], atol=1e-9)  # target -> principal point
    np.testing.assert_allclose(z[0], np.linalg.norm(target - center), rtol=1e-12)
    assert uv[1, 1] < uv[0, 1]  # world up (-y) appears toward the image top


def test_look_at_rejects_degenerate():
    with pytest.raises(InputError, match="parallel"):
        g.look_at([0.0, 3.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(InputError, match="centre equals target"):
        g.look_at([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])


def test_zero123_code_ring_cameras_15deg_apart():
    R_s, T_s = g.ring_pose(10.0, 20.0, 1.5)
    R_t, T_t = g.ring_pose(25.0, 20.0, 1.5)
    code = g.zero123_pose_code(R_s, T_s, R_t, T_t)
    np.testing.assert_allclose(code, [0.0, math.sin(math.radians(15)), math.cos(math.radians(15)), 0.0], atol=1e-12)
    back = g.zero123_pose_code(R_t, T_t, R_s, T_s)  # -15 deg mod 2 pi: sin flips, cos stays
    np.testing.assert_allclose(back[1:3], [-math.sin(math.radians(15)), math.cos(math.radians(15))], atol=1e-12)
    R_up, T_up = g.ring_pose(10.0, 35.0, 2.0)  # camera raised 15 deg and pushed out 0.5
    np.testing.assert_allclose(g.zero123_pose_code(R_s, T_s, R_up, T_up), [-math.radians(15), 0, 1, 0.5], atol=1e-12)


@SETTINGS
@given(seeds)
def test_zero123_code_matches_upstream_get_T_for_z_up(seed):
    """Reference: cvlab-columbia/zero123 ldm/data/simple.py get_T(target_RT, cond_RT), z-up world."""
    rng = np.random.default_rng(seed)
    (R_c, T_c), (R_t, T_t) = random_pose(rng), random_pose(rng)

    def spherical(xyz):
        xy = xyz[0] ** 2 + xyz[1] ** 2
        return np.arctan2(np.sqrt(xy), xyz[2]), np.arctan2(xyz[1], xyz[0]), np.sqrt(xy + xyz[2] ** 2)

    th_c, az_c, z_c = spherical(-R_c.T @ T_c)
    th_t, az_t, z_t = spherical(-R_t.T @ T_t)
    d_az = (az_t - az_c) % (2 * math.pi)
    expected = [th_t - th_c, math.sin(d_az), math.cos(d_az), z_t - z_c]
    np.testing.assert_allclose(g.zero123_pose_code(R_c, T_c, R_t, T_t, up=(0, 0, 1)), expected, atol=1e-12)


# --- pixels and points ----------------------------------------------------------------------------


def test_pixel_grid_centres_on_2x2_image():
    grid = g.pixel_grid(2, 3)
    assert grid.shape == (2, 3, 2)
    np.testing.assert_array_equal(grid[0, 0], [0.5, 0.5])
    np.testing.assert_array_equal(grid[1, 2], [2.5, 1.5])  # row 1, column 2 -> (u, v) = (2.5, 1.5)
    # 2x2 image, identity pose, principal point at the image centre (1, 1), depth 2:
    K = np.array([[1.0, 0, 1.0], [0, 1.0, 1.0], [0, 0, 1]])
    points = g.backproject(np.full((2, 2), 2.0), K, np.eye(3), np.zeros(3))
    np.testing.assert_allclose(points, [[-1, -1, 2], [1, -1, 2], [-1, 1, 2], [1, 1, 2]])  # row-major, y down


def test_backproject_hand_checked_pose_mask_and_invalid_depth():
    K = np.array([[2.0, 0, 1.0], [0, 2.0, 1.0], [0, 0, 1]])
    R, T = g.ring_pose(90.0, 0.0, 4.0)  # camera at (4, 0, 0) looking along -x; camera x is world +z
    depth = np.array([[3.0, 0.0], [np.nan, 3.0]])
    mask = np.array([[True, True], [True, False]])
    points = g.backproject(depth, K, R, T, mask)
    np.testing.assert_allclose(points, [[4 - 3, -0.75, -0.75]], atol=1e-12)  # pixel (0.5, 0.5): up-left


@SETTINGS
@given(seeds)
def test_backproject_project_round_trip(seed):
    rng = np.random.default_rng(seed)
    R, T = random_pose(rng)
    K = np.array(
        [
            [rng.uniform(50, 80), 0.3, rng.uniform(10, 14)],
            [0, rng.uniform(50, 80), rng.uniform(8, 12)],
            [0, 0, 1],
        ]
    )
    depth = rng.uniform(0.5, 4.0, size=(20, 24))
    points = g.backproject(depth, K, R, T)
    uv, z = g.project(points, K, R, T)
    np.testing.assert_allclose(uv, g.pixel_grid(20, 24).reshape(-1, 2), atol=1e-9)
    np.testing.assert_allclose(z, depth.reshape(-1), rtol=1e-12)


def test_backproject_numpy_and_torch_agree_and_batched_indices():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    depth = rng.uniform(1.0, 2.0, size=(3, 5, 6))
    depth[0, 1, 2] = 0.0
    depth[2, 4, 5] = np.inf
    K = np.broadcast_to(np.array([[10.0, 0, 3], [0, 10, 2.5], [0, 0, 1]]), (3, 3, 3))
    R = random_rotation(rng, 3)
    T = rng.normal(size=(3, 3))
    ref = g.backproject_views(depth, K, R, T)
    out = g.backproject_views(torch.from_numpy(depth), torch.from_numpy(K.copy()), torch.from_numpy(R), T)
    assert isinstance(out.points_n3, torch.Tensor) and out.points_n3.dtype == torch.float64
    assert len(ref.points_n3) == 3 * 5 * 6 - 2
    np.testing.assert_allclose(out.points_n3.numpy(), ref.points_n3, atol=1e-12)
    for name in ("view_n", "row_n", "col_n"):
        np.testing.assert_array_equal(getattr(out, name).numpy(), getattr(ref, name))
    for view in range(3):  # each view's rows equal the single-view call
        single = g.backproject(depth[view], K[view], R[view], T[view])
        np.testing.assert_allclose(ref.points_n3[ref.view_n == view], single, atol=1e-12)
    pts32 = g.backproject(torch.from_numpy(depth[1]).float(), K[1], R[1], T[1])
    assert pts32.dtype == torch.float32
    np.testing.assert_allclose(pts32.numpy(), g.backproject(depth[1], K[1], R[1], T[1]), atol=1e-4)
    uv, z = g.project(torch.from_numpy(ref.points_n3[ref.view_n == 1]), K[1], R[1], T[1])
    np.testing.assert_allclose(z.numpy(), depth[1].reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(uv.numpy(), g.pixel_grid(5, 6).reshape(-1, 2), atol=1e-9)


def test_backproject_numpy_chunks_threads_and_float32_depth_match_the_plain_formula(monkeypatch):
    rng = np.random.default_rng(11)
    depth = rng.uniform(1.0, 3.0, size=(4, 9, 7)).astype(np.float32)
    depth[rng.uniform(size=depth.shape) < 0.3] = 0.0
    mask = rng.uniform(size=depth.shape) < 0.9
    K = np.broadcast_to(np.array([[12.0, 0.2, 3.5], [0, 11, 4.5], [0, 0, 1]]), (4, 3, 3))
    R, T = random_rotation(rng, 4), rng.normal(size=(4, 3))
    monkeypatch.setattr(g, "_BACKPROJECT_CHUNK", 5)  # many chunks per view, a ragged last one
    monkeypatch.setattr(g, "_cpu_count", lambda: 3)  # views on a thread pool
    out = g.backproject_views(depth, K, R, T, mask)
    assert out.points_n3.dtype == np.float64
    view, row, col = np.nonzero((depth > 0) & mask)  # view, row, column order
    pix = np.stack([col + 0.5, row + 0.5, np.ones_like(col, dtype=float)], -1)
    cam = depth[view, row, col][:, None].astype(np.float64) * np.einsum("nij,nj->ni", np.linalg.inv(K)[view], pix)
    world = np.einsum("nji,nj->ni", R[view], cam - T[view])  # R^T (x_cam - T)
    np.testing.assert_allclose(out.points_n3, world, atol=1e-12)
    np.testing.assert_array_equal(out.view_n, view)
    np.testing.assert_array_equal(out.row_n, row)
    np.testing.assert_array_equal(out.col_n, col)
    np.testing.assert_array_equal(out.pixel_n, row * 7 + col)


def test_backproject_shape_errors():
    with pytest.raises(InputError, match=r"\[H, W\]"):
        g.backproject(np.ones(5), np.eye(3), np.eye(3), np.zeros(3))
    with pytest.raises(InputError, match="K_b33"):
        g.backproject_views(np.ones((2, 3, 3)), np.eye(3)[None], np.stack([np.eye(3)] * 2), np.zeros((2, 3)))
    with pytest.raises(InputError, match="mask_bhw"):
        g.backproject(np.ones((3, 3)), np.eye(3), np.eye(3), np.zeros(3), np.ones((2, 2), bool))


# --- alignment ------------------------------------------------------------------------------------


@SETTINGS
@given(seeds, st.booleans())
def test_umeyama_recovers_random_similarity(seed, reflect_input):
    rng = np.random.default_rng(seed)
    src = rng.normal(size=(10, 3))
    scale, R, t = rng.uniform(0.1, 10.0), random_rotation(rng), rng.normal(scale=5.0, size=3)
    dst = scale * src @ R.T + t
    s_fit, R_fit, t_fit = g.umeyama(src, dst)
    np.testing.assert_allclose([s_fit, *R_fit.ravel(), *t_fit], [scale, *R.ravel(), *t], atol=1e-9)
    if reflect_input:  # best orthogonal fit is a reflection: the answer must still be a rotation
        _, R_fix, _ = g.umeyama(src, dst * [1, 1, -1])
        np.testing.assert_allclose(np.linalg.det(R_fix), 1.0, atol=1e-12)
    s1, R1, _ = g.umeyama(src, src @ R.T + t, with_scale=False)
    assert s1 == 1.0
    np.testing.assert_allclose(R1, R, atol=1e-9)


def test_umeyama_rejects_bad_input():
    with pytest.raises(InputError, match="at least 3"):
        g.umeyama(np.zeros((2, 3)), np.zeros((2, 3)))
    collinear = np.outer(np.arange(5.0), [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="degenerate"):
        g.umeyama(collinear, collinear)
    with pytest.raises(InputError, match="equal shape"):
        g.umeyama(np.zeros((4, 3)), np.zeros((5, 3)))


def test_similarity_align_poses_undoes_a_world_similarity():
    rng = np.random.default_rng(3)
    R_ref, T_ref = g.ring_pose(np.linspace(-90, 90, 7), 5.0, 2.0)
    scale, R_w, t_w = 0.3, random_rotation(rng), rng.normal(size=3)  # est world: X_est = s R_w X_ref + t_w
    R_est = R_ref @ R_w.T
    T_est = scale * T_ref - R_est @ t_w
    center_3 = g.camera_centers(R_est[3], T_est[3])  # turn camera 3 by 5 deg about its own centre
    R_est[3] = g.quat_to_rotmat([math.cos(math.radians(2.5)), 0, math.sin(math.radians(2.5)), 0]) @ R_est[3]
    T_est[3] = -R_est[3] @ center_3
    out = g.similarity_align_poses(R_est, T_est, R_ref, T_ref)
    np.testing.assert_allclose(out.scale, 1 / scale, rtol=1e-9)
    np.testing.assert_allclose(out.center_error, 0.0, atol=1e-9)
    np.testing.assert_allclose(out.rotation_error_deg, [0, 0, 0, 5.0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.delete(out.R_n33, 3, axis=0), np.delete(R_ref, 3, axis=0), atol=1e-9)


# --- nerfstudio -----------------------------------------------------------------------------------


def test_opencv_to_opengl_hand_checked():
    c2w = g.opencv_w2c_to_opengl_c2w(np.eye(3), [0.0, 0.0, 2.0])
    np.testing.assert_allclose(c2w, [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, -2], [0, 0, 0, 1]])
    R, T = g.ring_pose(90.0, 0.0, 3.0)  # OpenGL camera looks along -z_cam: world -x here
    c2w = g.opencv_w2c_to_opengl_c2w(R, T)
    np.testing.assert_allclose(c2w[:3, 3], [3.0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(-c2w[:3, 2], [-1.0, 0, 0], atol=1e-12)  # viewing direction
    np.testing.assert_allclose(c2w[:3, 1], [0, -1.0, 0], atol=1e-12)  # OpenGL y = world up (-y)


@SETTINGS
@given(seeds)
def test_opencv_opengl_round_trip(seed):
    rng = np.random.default_rng(seed)
    R, T = random_rotation(rng, 4), rng.normal(size=(4, 3))
    c2w = g.opencv_w2c_to_opengl_c2w(R, T)
    assert c2w.shape == (4, 4, 4)
    np.testing.assert_allclose(c2w[:, 3], np.broadcast_to([0, 0, 0, 1.0], (4, 4)))
    R_back, T_back = g.opengl_c2w_to_opencv_w2c(c2w)
    np.testing.assert_allclose(R_back, R, atol=1e-12)
    np.testing.assert_allclose(T_back, T, atol=1e-12)
    R3, T3 = g.opengl_c2w_to_opencv_w2c(c2w[:, :3])  # [..., 3, 4] accepted too
    np.testing.assert_allclose(R3, R, atol=1e-12)
    np.testing.assert_allclose(T3, T, atol=1e-12)
    with pytest.raises(InputError, match="c2w"):
        g.opengl_c2w_to_opencv_w2c(np.eye(3))
