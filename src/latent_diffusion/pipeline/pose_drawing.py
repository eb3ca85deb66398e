"""Poses drawn as the OpenPose ControlNets were trained to read them (the ControlNet extension 1.1.455's
`annotator/openpose/util.py` and `animalpose.py`), on black, in RGB, keypoints in pixels: the body's 17 limbs as
ellipses at 60 % of their colour and its 18 points as discs; each hand's 20 bones in a rainbow of hues and its points
blue; the face's points white; an animal's 17 AP-10K bones as lines.

The extension's drawing functions guess whether points are in pixels or in 0..1 (all within 0..1: 0..1); DWPose's
are pixels, and are drawn as pixels here even in the corner case where that guess would call them normalized.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

# OpenPose's limbs (1-based point numbers) and its 18 colours, the first 17 also the limbs'
BODY_LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14)]
BODY_LIMBS += [(2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
BODY_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0)]
BODY_COLORS += [(0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255)]
BODY_COLORS += [(170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_BONES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12)]
HAND_BONES += [(0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
# AP-10K's bones (1-based) and their colours
ANIMAL_BONES = [(1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5), (5, 15)]
ANIMAL_BONES += [(15, 16), (16, 17), (5, 12), (12, 13), (13, 14)]
ANIMAL_COLORS = [(255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255)]
ANIMAL_COLORS += [(0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0)]
ANIMAL_COLORS += [(255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150)]
STICK_WIDTH = 4
EPS = 0.01  # hand and face points at pixel 0 (x or y) are not drawn


def draw_body(canvas: np.ndarray, body: list) -> None:
    """The limbs whose two ends are present, then the present points."""
    for (first, second), color in zip(BODY_LIMBS, BODY_COLORS):
        p, q = body[first - 1], body[second - 1]
        if p is None or q is None:
            continue
        length = ((p.y - q.y) ** 2 + (p.x - q.x) ** 2) ** 0.5
        angle = math.degrees(math.atan2(p.y - q.y, p.x - q.x))
        centre = (int((p.x + q.x) / 2), int((p.y + q.y) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for point, color in zip(body, BODY_COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point.x), int(point.y)), 4, color, thickness=-1)


def draw_hand(canvas: np.ndarray, hand: list | None) -> None:
    """The bones whose ends are present and off pixel 0, each of hue i/20, then the points in blue."""
    if not hand:
        return
    for i, (first, second) in enumerate(HAND_BONES):
        p, q = hand[first], hand[second]
        if p is None or q is None:
            continue
        ends = (int(p.x), int(p.y)), (int(q.x), int(q.y))
        if min(*ends[0], *ends[1]) > EPS:
            color = [c * 255 for c in colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0)]
            cv2.line(canvas, *ends, color, thickness=2)
    for point in hand:
        if point is not None and int(point.x) > EPS and int(point.y) > EPS:
            cv2.circle(canvas, (int(point.x), int(point.y)), 4, (0, 0, 255), thickness=-1)


def draw_face(canvas: np.ndarray, face: list | None) -> None:
    for point in face or []:
        if point is not None and int(point.x) > EPS and int(point.y) > EPS:
            cv2.circle(canvas, (int(point.x), int(point.y)), 3, (255, 255, 255), thickness=-1)


def draw_people(people: list, height: int, width: int) -> np.ndarray:
    """Each person's body, hands and face (`pose_estimation.Person`), one person after another: (H, W, 3) uint8."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        draw_body(canvas, person.body)
        draw_hand(canvas, person.left_hand)
        draw_hand(canvas, person.right_hand)
        draw_face(canvas, person.face)
    return canvas


def draw_animals(animals: list, height: int, width: int) -> np.ndarray:
    """Each animal's bones, 5 pixels wide: (H, W, 3) uint8."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for points in animals:
        for (first, second), color in zip(ANIMAL_BONES, ANIMAL_COLORS):
            p, q = points[first - 1], points[second - 1]
            cv2.line(canvas, (int(p.x), int(p.y)), (int(q.x), int(q.y)), color, 5)
    return canvas
