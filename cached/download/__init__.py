"""The download path: a request for image data, authorised, then served from the cache or a
fill.
"""
