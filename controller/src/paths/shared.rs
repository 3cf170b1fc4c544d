//! A path as the engine publishes it to sessions: the names are the engine's
//! own `Arc<str>`s, so a burst of path changes (a mesh of a thousand nodes
//! switching hundreds of thousands of pairs to a transit when their hold
//! ends) queues no string copies in the agents' outboxes. It goes on the wire
//! exactly as [`PathSpec`] does.

use serde::ser::{Serialize, SerializeStruct, Serializer};
use skymesh_wire::{PathSpec, Via};
use std::sync::Arc;

/// One hop choice: straight to the destination, or through a transit node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    Direct,
    Transit(Arc<str>),
}

impl Hop {
    fn to_via(&self) -> Via {
        match self {
            Hop::Direct => Via::Direct,
            Hop::Transit(name) => Via::Transit(name.to_string()),
        }
    }
}

/// [`PathSpec`] with shared names: 56 bytes, nothing on the heap of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPath {
    pub dest: Arc<str>,
    pub primary: Hop,
    pub backup: Option<Hop>,
}

impl SharedPath {
    pub fn to_spec(&self) -> PathSpec {
        PathSpec {
            dest: self.dest.to_string(),
            primary: self.primary.to_via(),
            backup: self.backup.as_ref().map(Hop::to_via),
        }
    }
}

// Written out by hand to match `Via`'s and `PathSpec`'s derived forms
// (externally tagged, snake_case; `backup` left out when there is none); a
// test holds them equal.
impl Serialize for Hop {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Hop::Direct => s.serialize_unit_variant("Via", 0, "direct"),
            Hop::Transit(name) => s.serialize_newtype_variant("Via", 1, "transit", &**name),
        }
    }
}

impl Serialize for SharedPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = if self.backup.is_some() { 3 } else { 2 };
        let mut st = s.serialize_struct("PathSpec", fields)?;
        st.serialize_field("dest", &*self.dest)?;
        st.serialize_field("primary", &self.primary)?;
        if let Some(backup) = &self.backup {
            st.serialize_field("backup", backup)?;
        }
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_path_goes_on_the_wire_as_a_path_spec() {
        let t: Arc<str> = Arc::from("gcp-\"eu\"");
        let cases = [
            SharedPath {
                dest: Arc::from("aws"),
                primary: Hop::Direct,
                backup: None,
            },
            SharedPath {
                dest: Arc::from("aws"),
                primary: Hop::Transit(t.clone()),
                backup: Some(Hop::Direct),
            },
            SharedPath {
                dest: Arc::from("ali"),
                primary: Hop::Direct,
                backup: Some(Hop::Transit(t)),
            },
        ];
        for shared in cases {
            let spec = shared.to_spec();
            assert_eq!(
                serde_json::to_string(&shared).expect("encodes"),
                serde_json::to_string(&spec).expect("encodes"),
            );
            let back: PathSpec =
                serde_json::from_str(&serde_json::to_string(&shared).expect("encodes"))
                    .expect("decodes as the wire type");
            assert_eq!(back, spec);
        }
        assert_eq!(std::mem::size_of::<SharedPath>(), 56);
    }
}
