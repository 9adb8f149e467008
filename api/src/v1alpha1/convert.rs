//! Conversions between the wire mapping (`VirtualVolume.status.mapping`: i64 bytes, camelCase)
//! and the domain model's [`ExtentMap`]. Wire values are untrusted input: every conversion
//! validates through [`ExtentMap::from_runs`].

use super::{MappedRun, ReplicaLocation as WireReplica, VolumeMapping};
use crate::model::{ExtentMap, ExtentSize, Generation, MapError, ReplicaLocation, Run};

/// Why a wire mapping cannot become an [`ExtentMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingConversionError {
    #[error("{field} is negative ({value})")]
    Negative { field: &'static str, value: i64 },
    #[error("generation {0} does not fit the API's int64")]
    GenerationTooLarge(u64),
    #[error("byte value {0} does not fit the API's int64")]
    ValueTooLarge(u64),
    #[error(transparent)]
    Map(#[from] MapError),
}

fn non_negative(field: &'static str, value: i64) -> Result<u64, MappingConversionError> {
    u64::try_from(value).map_err(|_| MappingConversionError::Negative { field, value })
}

fn to_i64(value: u64) -> Result<i64, MappingConversionError> {
    i64::try_from(value).map_err(|_| MappingConversionError::ValueTooLarge(value))
}

impl VolumeMapping {
    /// The model map of a volume whose `spec.sizeBytes` is `spec_size_bytes`, taking the
    /// mapping's own end when it reaches further. The operator grows a volume by committing the
    /// longer mapping first and raising `spec.sizeBytes` second (crash-safe order, docs/operator.md);
    /// between the two writes the committed mapping is the truth and must stay usable.
    pub fn to_model_committed(
        &self,
        spec_size_bytes: i64,
    ) -> Result<ExtentMap, MappingConversionError> {
        let mapped_end = self
            .extents
            .iter()
            .map(|run| run.offset.saturating_add(run.length))
            .max()
            .unwrap_or(0);
        self.to_model(spec_size_bytes.max(mapped_end))
    }

    /// The model map of a volume of `size_bytes` (the volume's `spec.sizeBytes`).
    pub fn to_model(&self, size_bytes: i64) -> Result<ExtentMap, MappingConversionError> {
        let size = non_negative("sizeBytes", size_bytes)?;
        let extent_size =
            ExtentSize::new(non_negative("extentSizeBytes", self.extent_size_bytes)?)?;
        let generation = Generation(non_negative("generation", self.generation)?);
        let runs = self
            .extents
            .iter()
            .map(|run| {
                let replicas = run
                    .replicas
                    .iter()
                    .map(|r| {
                        Ok(ReplicaLocation::new(
                            r.area.as_str(),
                            non_negative("areaOffset", r.area_offset)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, MappingConversionError>>()?;
                Ok(Run::new(
                    non_negative("offset", run.offset)?,
                    non_negative("length", run.length)?,
                    replicas,
                ))
            })
            .collect::<Result<Vec<_>, MappingConversionError>>()?;
        Ok(ExtentMap::from_runs(size, extent_size, generation, runs)?)
    }

    /// The wire form of a model map.
    pub fn from_model(map: &ExtentMap) -> Result<Self, MappingConversionError> {
        let generation = i64::try_from(map.generation().get())
            .map_err(|_| MappingConversionError::GenerationTooLarge(map.generation().get()))?;
        let extents = map
            .runs()
            .iter()
            .map(|run| {
                Ok(MappedRun {
                    offset: to_i64(run.offset)?,
                    length: to_i64(run.length)?,
                    replicas: run
                        .replicas
                        .iter()
                        .map(|r| {
                            Ok(WireReplica {
                                area: r.area.as_str().to_string(),
                                area_offset: to_i64(r.area_offset)?,
                            })
                        })
                        .collect::<Result<_, MappingConversionError>>()?,
                })
            })
            .collect::<Result<_, MappingConversionError>>()?;
        Ok(VolumeMapping {
            generation,
            extent_size_bytes: to_i64(map.extent_size().get())?,
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ByteRange;

    const MIB: u64 = 1 << 20;

    #[test]
    fn committed_model_follows_a_mapping_grown_ahead_of_the_spec() {
        let es = ExtentSize::new(4 * MIB).unwrap();
        let grown = ExtentMap::new_hole(12 * MIB, es)
            .unwrap()
            .assign(
                ByteRange::new(0, 12 * MIB).unwrap(),
                vec![ReplicaLocation::new("a0", 0)],
            )
            .unwrap();
        let wire = VolumeMapping::from_model(&grown).unwrap();
        // Between the operator's two growth writes: mapping at 12 MiB, spec still 8 MiB.
        assert!(wire.to_model((8 * MIB) as i64).is_err());
        let map = wire.to_model_committed((8 * MIB) as i64).unwrap();
        assert_eq!(map.size_bytes(), 12 * MIB);
        // Once the spec caught up (or is larger), the spec size wins as before.
        assert_eq!(
            wire.to_model_committed((12 * MIB) as i64)
                .unwrap()
                .size_bytes(),
            12 * MIB
        );
    }

    #[test]
    fn round_trip_keeps_runs_holes_replicas_and_generation() {
        let es = ExtentSize::new(4 * MIB).unwrap();
        let map = ExtentMap::new_hole(12 * MIB, es)
            .unwrap()
            .assign(
                ByteRange::new(0, 4 * MIB).unwrap(),
                vec![
                    ReplicaLocation::new("a0", 8 * MIB),
                    ReplicaLocation::new("b0", 0),
                ],
            )
            .unwrap()
            .assign(
                ByteRange::new(8 * MIB, 4 * MIB).unwrap(),
                vec![
                    ReplicaLocation::new("a1", 0),
                    ReplicaLocation::new("b0", 4 * MIB),
                ],
            )
            .unwrap();
        let wire = VolumeMapping::from_model(&map).unwrap();
        assert_eq!(wire.extents.len(), 3, "mapped, hole, mapped");
        assert!(wire.extents[1].replicas.is_empty());
        assert_eq!(wire.extent_size_bytes, (4 * MIB) as i64);
        assert_eq!(wire.generation, map.generation().get() as i64);
        let back = wire.to_model((12 * MIB) as i64).unwrap();
        assert_eq!(back, map);
    }

    #[test]
    fn negative_wire_values_are_refused() {
        let wire = VolumeMapping {
            generation: 1,
            extent_size_bytes: 4 * MIB as i64,
            extents: vec![MappedRun {
                offset: 0,
                length: 4 * MIB as i64,
                replicas: vec![WireReplica {
                    area: "a0".into(),
                    area_offset: -4096,
                }],
            }],
        };
        assert_eq!(
            wire.to_model(4 * MIB as i64),
            Err(MappingConversionError::Negative {
                field: "areaOffset",
                value: -4096
            })
        );
        assert!(matches!(
            VolumeMapping {
                generation: -1,
                ..wire.clone()
            }
            .to_model(4 * MIB as i64),
            Err(MappingConversionError::Negative {
                field: "generation",
                ..
            })
        ));
    }

    #[test]
    fn invalid_maps_are_refused_by_the_model() {
        // Runs that leave a gap do not tile the volume.
        let wire = VolumeMapping {
            generation: 1,
            extent_size_bytes: 4 * MIB as i64,
            extents: vec![MappedRun {
                offset: 0,
                length: 4 * MIB as i64,
                replicas: vec![],
            }],
        };
        assert!(matches!(
            wire.to_model(8 * MIB as i64),
            Err(MappingConversionError::Map(_))
        ));
        // An extent size that is not a power of two.
        let wire = VolumeMapping {
            extent_size_bytes: 3 * MIB as i64,
            ..wire
        };
        assert!(matches!(
            wire.to_model(4 * MIB as i64),
            Err(MappingConversionError::Map(
                MapError::InvalidExtentSize { .. }
            ))
        ));
    }
}
