"""Draws examples/poster.png, the bundled example poster (our own artwork, CC0).

A night-sky science-fiction poster: gradient sky, stars, a planet, a rocket and a title.
Run: python3 docs/make_example_poster.py (needs Pillow). The PNG is committed; this
script documents how it was made.
"""
import random
from PIL import Image, ImageDraw, ImageFont

W, H = 448, 672
random.seed(7)
img = Image.new("RGB", (W, H))
d = ImageDraw.Draw(img)
for y in range(H):  # deep blue to violet sky
    t = y / H
    d.line([(0, y), (W, y)], fill=(int(10 + 60 * t), int(10 + 15 * t), int(40 + 60 * t)))
for _ in range(220):  # stars
    x, y, r = random.randrange(W), random.randrange(int(H * 0.75)), random.choice([1, 1, 1, 2])
    d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 230))
d.ellipse([250, 90, 420, 260], fill=(230, 120, 60))  # planet
d.ellipse([270, 100, 430, 250], fill=(200, 90, 50))
d.arc([200, 150, 470, 200], 0, 360, fill=(240, 200, 150), width=4)  # ring
d.polygon([(0, H), (0, 560), (120, 520), (260, 570), (448, 510), (448, H)], fill=(20, 15, 25))  # hills
d.polygon([(200, 300), (224, 240), (248, 300), (248, 430), (200, 430)], fill=(220, 220, 230))  # rocket
d.polygon([(200, 400), (180, 450), (200, 430)], fill=(200, 40, 40))
d.polygon([(248, 400), (268, 450), (248, 430)], fill=(200, 40, 40))
d.ellipse([214, 320, 234, 340], fill=(60, 120, 200))
d.polygon([(205, 430), (224, 500), (243, 430)], fill=(255, 170, 40))  # flame
font = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
title = ImageFont.truetype(font, 38)
small = ImageFont.truetype(font, 18)
d.text((W // 2, 585), "THE LAST SIGNAL", font=title, anchor="mm", fill=(250, 240, 220))
d.text((W // 2, 630), "BEYOND THE EDGE OF THE STARS", font=small, anchor="mm", fill=(200, 190, 220))
img.save("examples/poster.png", optimize=True)
